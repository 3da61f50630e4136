// The shell's tests, shared by two test targets:
//
// - `tests/shell.rs` brings `dtf::test` into scope as `test`, so each `#[test]` below is a
//   `#[dtf::test]` and runs in its own process;
// - `tests/shell_std.rs` leaves `#[test]` as std's, so every test is a thread of one process.
//
// The tests are written the way tests of a shell are: each one `cd`s, exports and unsets as it
// needs and never puts anything back, because it assumes that it owns the process.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use shell_env::{Shell, ShellError};

type TestResult = Result<(), Box<dyn Error>>;

/// Runs `cd` into `dir`, quoted so that any path works.
fn cd(sh: &mut Shell, dir: &Path) -> Result<(), ShellError> {
    sh.run_line(&format!("cd '{}'", dir.display()))?;
    Ok(())
}

/// Runs `export NAME=DIR`, quoted so that any path works.
fn export_path(sh: &mut Shell, name: &str, dir: &Path) -> Result<(), ShellError> {
    sh.run_line(&format!("export {name}='{}'", dir.display()))?;
    Ok(())
}

/// What `pwd` prints, as a path.
fn pwd(sh: &mut Shell) -> Result<PathBuf, ShellError> {
    Ok(PathBuf::from(sh.run_line("pwd")?.text()))
}

/// Lays out a small project under `root`: `README.md`, `src/main.rs` and an empty `target/`.
fn make_project(root: &Path) -> std::io::Result<PathBuf> {
    let project = root.join("project");
    fs::create_dir_all(project.join("src"))?;
    fs::create_dir_all(project.join("target"))?;
    fs::write(project.join("README.md"), "# project\n")?;
    fs::write(project.join("src/main.rs"), "fn main() {}\n")?;
    Ok(project)
}

/// The names in `dir`, sorted.
fn list(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = fs::read_dir(dir)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

#[test]
fn a_new_shell_starts_in_the_package_root() -> TestResult {
    let mut sh = Shell::new();
    let here = pwd(&mut sh)?;
    assert_eq!(
        here.canonicalize()?,
        Path::new(env!("CARGO_MANIFEST_DIR")).canonicalize()?
    );
    // Relative paths are relative to the package, as `cargo test` promises.
    let manifest = fs::read_to_string("Cargo.toml")?;
    assert!(manifest.contains(r#"name = "shell-env""#));
    Ok(())
}

#[test]
fn cd_into_a_created_directory() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let project = make_project(tmp.path())?;
    let mut sh = Shell::new();

    cd(&mut sh, &project)?;
    assert_eq!(list(Path::new("."))?, ["README.md", "src", "target"]);
    sh.run_line("cd src")?;
    fs::write("lib.rs", "pub fn answer() -> u32 { 42 }\n")?;
    assert_eq!(list(&project.join("src"))?, ["lib.rs", "main.rs"]);

    assert_eq!(pwd(&mut sh)?, project.join("src"));
    assert_eq!(std::env::var("PWD")?, project.join("src").to_str().unwrap());
    Ok(())
}

#[test]
fn relative_cd_resolves_against_pwd() -> TestResult {
    let tmp = tempfile::tempdir()?;
    fs::create_dir_all(tmp.path().join("work/client"))?;
    fs::create_dir_all(tmp.path().join("work/server"))?;
    let mut sh = Shell::new();

    cd(&mut sh, &tmp.path().join("work/client"))?;
    fs::write("client.toml", "port = 8080\n")?;
    sh.run_line("cd ../server")?;
    fs::write("server.toml", "port = 8080\n")?;

    assert_eq!(pwd(&mut sh)?, tmp.path().join("work/server"));
    assert_eq!(
        PathBuf::from(sh.run_line("pwd -P")?.text()),
        tmp.path().join("work/server").canonicalize()?
    );
    assert!(tmp.path().join("work/server/server.toml").is_file());
    Ok(())
}

#[test]
fn cd_without_an_argument_goes_home() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home/alice");
    fs::create_dir_all(&home)?;
    let project = make_project(tmp.path())?;
    let mut sh = Shell::new();

    export_path(&mut sh, "HOME", &home)?;
    cd(&mut sh, &project)?;
    fs::write(".envrc", "export PROJECT_NAME=project\n")?;
    thread::sleep(Duration::from_millis(5));
    sh.run_line("cd")?;

    assert_eq!(pwd(&mut sh)?, home);
    assert_eq!(std::env::var("OLDPWD")?, project.to_str().unwrap());
    Ok(())
}

#[test]
fn cd_dash_returns_to_oldpwd() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let project = make_project(tmp.path())?;
    let mut sh = Shell::new();

    cd(&mut sh, &project)?;
    sh.run_line("cd target")?;
    fs::create_dir("debug")?;
    fs::write("debug/app", "")?;

    let out = sh.run_line("cd -")?;
    assert_eq!(
        out.text(),
        project.to_str().unwrap(),
        "`cd -` prints where it went"
    );
    assert_eq!(pwd(&mut sh)?, project);
    assert_eq!(
        std::env::var("OLDPWD")?,
        project.join("target").to_str().unwrap()
    );

    sh.run_line("cd -")?;
    assert_eq!(pwd(&mut sh)?, project.join("target"));
    Ok(())
}

#[test]
fn cd_dash_without_oldpwd_is_an_error() -> TestResult {
    let mut sh = Shell::new();
    sh.run_line("unset OLDPWD")?;
    let before = pwd(&mut sh)?;
    thread::yield_now();

    let err = sh
        .run_line("cd -")
        .expect_err("`cd -` without OLDPWD must fail");
    assert!(
        matches!(err, ShellError::OldPwdNotSet),
        "unexpected error: {err}"
    );
    assert_eq!(err.to_string(), "cd: OLDPWD not set");
    assert_eq!(pwd(&mut sh)?, before);
    Ok(())
}

#[test]
fn cd_without_home_is_an_error() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let project = make_project(tmp.path())?;
    let mut sh = Shell::new();

    cd(&mut sh, &project)?;
    sh.run_line("unset HOME")?;
    fs::write("notes.txt", "no home today\n")?;

    let err = sh.run_line("cd").expect_err("`cd` without HOME must fail");
    assert!(
        matches!(err, ShellError::HomeNotSet),
        "unexpected error: {err}"
    );
    assert_eq!(sh.run_line("echo ~/notes.txt")?.text(), "~/notes.txt");
    assert_eq!(pwd(&mut sh)?, project);
    Ok(())
}

#[test]
fn cd_into_a_missing_directory_keeps_the_working_directory() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let project = make_project(tmp.path())?;
    let mut sh = Shell::new();

    cd(&mut sh, &project)?;
    let err = sh
        .run_line("cd does-not-exist")
        .expect_err("`cd` into a missing directory must fail");
    assert!(
        matches!(err, ShellError::ChangeDir { .. }),
        "unexpected error: {err}"
    );
    assert!(err.to_string().starts_with("cd: does-not-exist: "), "{err}");
    fs::write("still-here.txt", "")?;

    assert_eq!(pwd(&mut sh)?, project);
    assert!(project.join("still-here.txt").is_file());
    Ok(())
}

#[test]
fn tilde_expands_to_home() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home/bob");
    fs::create_dir_all(home.join(".config"))?;
    let mut sh = Shell::new();

    export_path(&mut sh, "HOME", &home)?;
    fs::write(home.join(".config/app.toml"), "theme = \"dark\"\n")?;
    thread::sleep(Duration::from_millis(5));

    let config = sh.run_line("echo ~/.config/app.toml")?;
    assert_eq!(
        config.text(),
        home.join(".config/app.toml").to_str().unwrap()
    );
    assert_eq!(fs::read_to_string(config.text())?, "theme = \"dark\"\n");
    assert_eq!(sh.run_line("echo ~")?.text(), home.to_str().unwrap());
    assert_eq!(sh.run_line("echo '~' a~ ~bob")?.text(), "~ a~ ~bob");
    Ok(())
}

#[test]
fn home_expands_in_every_spelling() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home/carol");
    fs::create_dir_all(&home)?;
    let mut sh = Shell::new();

    export_path(&mut sh, "HOME", &home)?;
    cd(&mut sh, &home)?;
    fs::write(".profile", "export EDITOR=vi\n")?;

    let out = sh.run_line(r#"echo $HOME ${HOME}/.profile "$HOME" '$HOME'"#)?;
    let h = home.display();
    assert_eq!(out.text(), format!("{h} {h}/.profile {h} $HOME"));
    assert_eq!(sh.run_line("echo $PWD")?.text(), home.to_str().unwrap());
    Ok(())
}

#[test]
fn an_unset_variable_expands_to_nothing() -> TestResult {
    let mut sh = Shell::new();
    sh.run_line("export PROJECT_NAME=demo")?;
    assert_eq!(sh.run_line("echo $PROJECT_NAME")?.text(), "demo");

    let tmp = tempfile::tempdir()?;
    fs::write(tmp.path().join("demo.txt"), "demo\n")?;
    sh.run_line("unset PROJECT_NAME")?;
    thread::yield_now();

    let out = sh.run_line("echo [$PROJECT_NAME] [${PROJECT_NAME}]")?;
    assert_eq!(out.text(), "[] []");
    assert_eq!(sh.run_line("echo $PROJECT_NAME")?.text(), "");
    assert!(std::env::var_os("PROJECT_NAME").is_none());
    Ok(())
}

#[test]
fn export_expands_its_value() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let project = make_project(tmp.path())?;
    let mut sh = Shell::new();

    cd(&mut sh, &project)?;
    sh.run_line("export PROJECT_NAME=project PROJECT_ROOT=$PWD")?;
    sh.run_line("export BUILD_DIR=$PROJECT_ROOT/target")?;
    fs::create_dir_all("target/release")?;
    sh.run_line("cd $BUILD_DIR/release")?;

    assert_eq!(pwd(&mut sh)?, project.join("target/release"));
    assert_eq!(
        sh.run_line("echo ${PROJECT_NAME}: $BUILD_DIR")?.text(),
        format!("project: {}", project.join("target").display())
    );
    Ok(())
}

#[test]
fn relative_file_paths_follow_cd() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let project = make_project(tmp.path())?;
    let mut sh = Shell::new();

    cd(&mut sh, &project)?;
    fs::write("build.log", "compiling project\n")?;
    thread::sleep(Duration::from_millis(5));

    assert_eq!(fs::read_to_string("README.md")?, "# project\n");
    assert_eq!(
        fs::read_to_string(project.join("build.log"))?,
        "compiling project\n"
    );
    assert_eq!(
        std::env::current_dir()?.canonicalize()?,
        project.canonicalize()?
    );
    Ok(())
}
