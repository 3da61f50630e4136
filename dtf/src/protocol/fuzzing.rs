//! Entry points for coverage-guided fuzzing of what a peer sends: the frame decoders, the
//! handshake and every request decoder. The fuzz targets in `fuzz/` call these, and a test
//! replays the corpus in `fuzz/corpus/` through them under `cargo test` (see
//! `docs/security.md`). Each must return, never panic, whatever the bytes.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use super::messages::{WorkerRequest, WorkerResponse};
use super::token::Token;
use super::transport::{
    FrameCodec, MAX_FRAME, MAX_REQUEST_FRAME, client_handshake, server_handshake,
};

/// The bytes of a connection after its handshake, as a worker and as a coordinator decode
/// them into frames (tarpc requests and responses), until the first error or the end.
pub fn frames(data: &[u8]) {
    let mut worker: FrameCodec<tarpc::ClientMessage<WorkerRequest>, ()> =
        FrameCodec::worker(MAX_REQUEST_FRAME);
    drain(&mut worker, data);
    let mut coordinator: FrameCodec<tarpc::Response<WorkerResponse>, ()> =
        FrameCodec::new(MAX_FRAME);
    drain(&mut coordinator, data);
}

fn drain<D: Decoder>(codec: &mut D, data: &[u8]) {
    let mut buf = BytesMut::from(data);
    // Each decoded frame consumes at least its 4-byte length: bounded by the input.
    for _ in 0..=data.len() / 4 {
        match codec.decode(&mut buf) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
}

/// One request body, a response body and an input manifest, as the worker, the coordinator
/// and the worker's tree builder decode them.
pub fn requests(data: &[u8]) {
    if super::transport::check_request_deadline(data).is_ok() {
        let _ = postcard::from_bytes::<tarpc::ClientMessage<WorkerRequest>>(data);
    }
    let _ = postcard::from_bytes::<WorkerRequest>(data);
    let _ = postcard::from_bytes::<WorkerResponse>(data);
    let _ = crate::inputs::Manifest::decode(data);
}

/// The handshake with `data` as everything the other side sends: the worker's side (with and
/// without a token) and the coordinator's.
pub fn handshake(data: &[u8]) {
    let token =
        Token::new("fuzzing-token-0123456789abcdef0123456789", "fuzzing").expect("a valid token");
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(_) => return,
    };
    runtime.block_on(async {
        let io = tokio::io::join(data, tokio::io::sink());
        let _ = server_handshake(io, Some(&token)).await;
        let io = tokio::io::join(data, tokio::io::sink());
        let _ = server_handshake(io, None).await;
        let io = tokio::io::join(data, tokio::io::sink());
        let _ = client_handshake(io, Some(&token)).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of the fuzz corpus (seeds, and inputs that once crashed) through the same
    /// entry points as the fuzz targets: each is a regression test.
    #[test]
    fn the_fuzz_corpus_replays_without_a_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut replayed = 0;
        for (target, run) in [
            ("frames", frames as fn(&[u8])),
            ("requests", requests),
            ("handshake", handshake),
        ] {
            let dir = root.join(target);
            let entries = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("the corpus {}: {e}", dir.display()));
            let mut files = 0;
            for entry in entries {
                let path = entry.expect("a corpus entry").path();
                let data = std::fs::read(&path).expect("a corpus file");
                run(&data);
                files += 1;
            }
            assert!(files > 0, "no corpus for {target}");
            replayed += files;
        }
        assert!(replayed >= 3);
    }

    #[test]
    fn a_deadline_too_far_away_is_refused_before_tarpc_sees_it() {
        // The input that crashed the worker: `ClientMessage::Request` with a deadline of
        // u64::MAX seconds (tarpc computes `Instant::now() + deadline`).
        let mut body = vec![0u8];
        body.extend([0xff; 9]);
        body.push(0x01);
        body.extend([0u8; 40]);
        let crashed = std::panic::catch_unwind(|| {
            postcard::from_bytes::<tarpc::ClientMessage<WorkerRequest>>(&body).is_ok()
        });
        assert!(
            crashed.is_err(),
            "tarpc no longer panics on such a deadline"
        );
        let err = super::super::transport::check_request_deadline(&body).unwrap_err();
        assert!(err.contains("more than a year"), "{err}");
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend(&body);
        let mut codec: FrameCodec<tarpc::ClientMessage<WorkerRequest>, ()> =
            FrameCodec::worker(MAX_REQUEST_FRAME);
        let err = codec
            .decode(&mut BytesMut::from(&frame[..]))
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("deadline"), "{err}");
        // A deadline of a minute passes the check.
        assert!(super::super::transport::check_request_deadline(&[0, 60, 0]).is_ok());
        frames(&frame);
    }
}
