//! Splitting a command line into words, with quoting and expansion.
//!
//! The rules are a small subset of POSIX `sh`:
//!
//! - words are separated by unquoted whitespace; an unquoted `#` at the start of a word begins
//!   a comment that runs to the end of the line;
//! - `'...'` is taken literally; `"..."` expands variables, and `\` in it escapes `"`, `\`
//!   and `$`; an unquoted `\` escapes the next character;
//! - `$NAME` and `${NAME}` expand to the variable's value, or to nothing when it is unset;
//! - an unquoted `~` at the start of a word, alone or before `/`, expands to `$HOME` (and
//!   stays `~` when `HOME` is unset);
//! - expansions are not split into fields: a value with spaces stays one word. A word made only
//!   of unquoted expansions that are all empty disappears, so `cd $UNSET` is `cd`.

use std::iter::Peekable;
use std::str::Chars;

use crate::ShellError;

/// Splits `line` into words, expanding variables with `lookup`.
pub(crate) fn split(
    line: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, ShellError> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();

    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.peek() {
            None | Some('#') => return Ok(words),
            Some(_) => {}
        }
        let word = read_word(&mut chars, &lookup)?;
        if !word.text.is_empty() || word.keep_if_empty {
            words.push(word.text);
        }
    }
}

/// One word, as read before deciding whether it survives.
struct Word {
    text: String,
    /// The word has a literal character or quotes, so it stays even when its text is empty.
    keep_if_empty: bool,
}

/// Reads one word, starting at a non-whitespace character.
fn read_word(
    chars: &mut Peekable<Chars<'_>>,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Word, ShellError> {
    let mut word = Word {
        text: String::new(),
        keep_if_empty: false,
    };

    if chars.peek() == Some(&'~') {
        chars.next();
        let alone = chars.peek().is_none_or(|&c| c == '/' || c.is_whitespace());
        match lookup("HOME").filter(|_| alone) {
            Some(home) => word.text.push_str(&home),
            None => word.text.push('~'),
        }
        word.keep_if_empty = true;
    }

    while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
        match c {
            '\'' => {
                word.keep_if_empty = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.text.push(c),
                        None => return Err(ShellError::UnterminatedQuote { quote: '\'' }),
                    }
                }
            }
            '"' => {
                word.keep_if_empty = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next_if(|c| matches!(c, '"' | '\\' | '$')) {
                            Some(escaped) => word.text.push(escaped),
                            None => word.text.push('\\'),
                        },
                        Some('$') => expand(chars, lookup, &mut word.text)?,
                        Some(c) => word.text.push(c),
                        None => return Err(ShellError::UnterminatedQuote { quote: '"' }),
                    }
                }
            }
            '\\' => {
                word.keep_if_empty = true;
                word.text.push(chars.next().unwrap_or('\\'));
            }
            '$' => expand(chars, lookup, &mut word.text)?,
            c => {
                word.keep_if_empty = true;
                word.text.push(c);
            }
        }
    }
    Ok(word)
}

/// Expands what follows a `$` into `out`. A `$` that starts no expansion stays a `$`.
fn expand(
    chars: &mut Peekable<Chars<'_>>,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), ShellError> {
    let name = if chars.next_if_eq(&'{').is_some() {
        let mut name = String::new();
        loop {
            match chars.next() {
                Some('}') => break,
                Some(c) => name.push(c),
                None => return Err(ShellError::BadSubstitution(format!("${{{name}"))),
            }
        }
        if !is_name(&name) {
            return Err(ShellError::BadSubstitution(format!("${{{name}}}")));
        }
        name
    } else if chars
        .peek()
        .is_some_and(|&c| c == '_' || c.is_ascii_alphabetic())
    {
        let mut name = String::new();
        while let Some(c) = chars.next_if(|&c| c == '_' || c.is_ascii_alphanumeric()) {
            name.push(c);
        }
        name
    } else {
        out.push('$');
        return Ok(());
    };

    if let Some(value) = lookup(&name) {
        out.push_str(&value);
    }
    Ok(())
}

/// Whether `name` can name a variable: `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::split;

    fn vars(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/home/alice".to_owned()),
            "GREETING" => Some("hello world".to_owned()),
            _ => None,
        }
    }

    #[dtf::test]
    fn quotes_and_expansions() {
        let words = split(r#"echo '$HOME' "$GREETING" ${HOME}/x ~/notes"#, vars).unwrap();
        assert_eq!(
            words,
            [
                "echo",
                "$HOME",
                "hello world",
                "/home/alice/x",
                "/home/alice/notes"
            ]
        );
    }

    #[dtf::test]
    fn empty_unquoted_expansions_disappear() {
        assert_eq!(split("cd $UNSET", vars).unwrap(), ["cd"]);
        assert_eq!(split(r#"cd "$UNSET""#, vars).unwrap(), ["cd", ""]);
    }

    #[dtf::test]
    fn comments_end_the_line() {
        assert_eq!(split("pwd # where am I", vars).unwrap(), ["pwd"]);
    }
}
