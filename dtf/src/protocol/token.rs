//! The shared token: loaded from `DTF_TOKEN`, `DTF_TOKEN_FILE` or `--token-file`, checked for
//! length, and turned into the 32-byte pre-shared key of the handshake.

use std::fmt;
use std::io;
use std::path::Path;

use thiserror::Error;

/// The variable holding the shared token.
pub const TOKEN_VAR: &str = "DTF_TOKEN";

/// The variable naming a file that holds the shared token.
pub const TOKEN_FILE_VAR: &str = "DTF_TOKEN_FILE";

/// The fewest characters a token may have. A token made by `dtf-worker token` has 64 (256 random
/// bits); 32 characters is the least that keeps guessing hopeless even for a token typed by hand
/// from a reasonable alphabet.
pub const MIN_TOKEN_LEN: usize = 32;

/// How to make a good token, for error messages.
pub const HOW_TO_MAKE_A_TOKEN: &str = "make one with `dtf-worker token --out FILE` (256 random bits, written with mode 600) \
     and pass it as --token-file FILE or DTF_TOKEN_FILE=FILE";

const KEY_CONTEXT: &str = "dtf-worker 2026 connection token v1";

/// The shared secret, as a key derived from the token text (the text itself is not kept).
#[derive(Clone)]
pub struct Token {
    key: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// A token that cannot be used.
#[derive(Debug, Error)]
pub enum TokenError {
    /// The token is empty.
    #[error("the token in {source_name} is empty: {HOW_TO_MAKE_A_TOKEN}")]
    Empty {
        /// Where it came from.
        source_name: String,
    },
    /// The token is too short to resist guessing.
    #[error(
        "the token in {source_name} is too short ({len} characters; at least {MIN_TOKEN_LEN} are needed so that it cannot be guessed): {HOW_TO_MAKE_A_TOKEN}"
    )]
    TooShort {
        /// Where it came from.
        source_name: String,
        /// Its length in characters.
        len: usize,
    },
    /// The token file cannot be read.
    #[error("cannot read the token file {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// Why.
        error: io::Error,
    },
}

impl Token {
    /// A token from its text (surrounding whitespace is ignored). `source_name` names where it
    /// came from, for the error message. Tokens shorter than [`MIN_TOKEN_LEN`] characters are
    /// refused.
    pub fn new(text: &str, source_name: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty {
                source_name: source_name.to_owned(),
            });
        }
        let len = text.chars().count();
        if len < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort {
                source_name: source_name.to_owned(),
                len,
            });
        }
        Ok(Token {
            key: blake3::derive_key(KEY_CONTEXT, text.as_bytes()),
        })
    }

    /// A token read from a file.
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|error| TokenError::File {
            path: path.display().to_string(),
            error,
        })?;
        Token::new(&text, &path.display().to_string())
    }

    /// The token from `DTF_TOKEN`, else from the file `DTF_TOKEN_FILE` names; `None` when
    /// neither is set.
    pub fn from_env() -> Result<Option<Token>, TokenError> {
        if let Some(text) = std::env::var_os(TOKEN_VAR).filter(|v| !v.is_empty()) {
            return Token::new(&text.to_string_lossy(), TOKEN_VAR).map(Some);
        }
        match std::env::var_os(TOKEN_FILE_VAR).filter(|v| !v.is_empty()) {
            Some(path) => Token::from_file(Path::new(&path)).map(Some),
            None => Ok(None),
        }
    }

    /// A fresh random token's text: 256 bits from the operating system, as 64 hex characters.
    pub fn random_text() -> io::Result<String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
        Ok(blake3::Hash::from_bytes(bytes).to_hex().to_string())
    }

    /// The handshake's pre-shared key.
    pub(super) fn psk(&self) -> &[u8; 32] {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_tokens_are_refused_with_how_to_make_one() {
        let err = Token::new("hunter2", "DTF_TOKEN").unwrap_err().to_string();
        assert!(err.contains("too short (7 characters"), "{err}");
        assert!(err.contains("dtf-worker token --out FILE"), "{err}");
        let err = Token::new("  \n", "f").unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        assert!(Token::new(&"x".repeat(31), "t").is_err());
        assert!(Token::new(&format!(" {}\n", "x".repeat(32)), "t").is_ok());
    }

    #[test]
    fn random_tokens_are_long_distinct_and_accepted() {
        let a = Token::random_text().unwrap();
        let b = Token::random_text().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(Token::new(&a, "t").is_ok());
    }
}
