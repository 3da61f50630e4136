// The server's tests, shared by two test targets that differ in the isolation level only:
//
// - `tests/ports.rs` expands them with `isolation = "full"`: each test gets its own network,
//   its own /tmp and its own PID namespace, and they all pass side by side;
// - `tests/ports_env.rs` expands them with `isolation = "env"`: a fresh process and environment
//   per test, but one network, one /tmp and one process table for all.
//
// The tests are written the way tests of such a server often are: they use its defaults, hold
// the port for a while, and never clean up.

/// Defines every test at the isolation level given as a string literal.
macro_rules! cases {
    ($level:tt) => {
        use std::io::{BufRead, BufReader, Write};
        use std::time::Duration;

        use ports::{DEFAULT_ADDR, Server};

        /// How long each server test holds the port, as a real test's work would.
        const HOLD: Duration = Duration::from_millis(300);

        /// Sends `line` and returns what came back.
        fn round_trip(server: &Server, line: &str) -> std::io::Result<String> {
            let mut conn = std::net::TcpStream::connect(server.addr())?;
            conn.write_all(format!("{line}\n").as_bytes())?;
            let mut back = String::new();
            BufReader::new(conn).read_line(&mut back)?;
            Ok(back.trim_end().to_owned())
        }

        #[dtf::test(isolation = $level)]
        fn echoes_a_line() -> std::io::Result<()> {
            let server = Server::start(DEFAULT_ADDR)?;
            assert_eq!(round_trip(&server, "hello")?, "hello");
            std::thread::sleep(HOLD);
            Ok(())
        }

        #[dtf::test(isolation = $level)]
        fn echoes_an_empty_line() -> std::io::Result<()> {
            let server = Server::start(DEFAULT_ADDR)?;
            assert_eq!(round_trip(&server, "")?, "");
            std::thread::sleep(HOLD);
            Ok(())
        }

        #[dtf::test(isolation = $level)]
        fn echoes_to_several_clients() -> std::io::Result<()> {
            let server = Server::start(DEFAULT_ADDR)?;
            for i in 0..3 {
                assert_eq!(round_trip(&server, &i.to_string())?, i.to_string());
            }
            std::thread::sleep(HOLD);
            Ok(())
        }

        #[dtf::test(isolation = $level)]
        fn state_survives_a_reload() -> std::io::Result<()> {
            ports::save_state("alpha")?;
            std::thread::sleep(HOLD);
            assert_eq!(ports::load_state()?, "alpha");
            Ok(())
        }

        #[dtf::test(isolation = $level)]
        fn state_can_be_replaced() -> std::io::Result<()> {
            ports::save_state("beta")?;
            std::thread::sleep(HOLD);
            assert_eq!(ports::load_state()?, "beta");
            Ok(())
        }

        #[dtf::test(isolation = $level)]
        fn helper_starts() -> std::io::Result<()> {
            ports::start_helper()
        }
    };
}
