//! Filter expressions (`cargo dtf -E EXPR`, `filter = "EXPR"` in `.config/dtf.toml`), with
//! cargo-nextest's filterset meaning so users reuse what they know:
//!
//! - `test(M)`: the test's name (default matcher: contains);
//! - `binary(M)`: the binary's target name; `binary_id(M)`: its id (`my-pkg::integration`);
//!   `package(M)`: its package (default matcher for these three: glob);
//! - `kind(M)`: `lib`, `test`, `bin`, `example`, `bench`, `proc-macro` (default: equal);
//! - `all()`, `none()`;
//! - `not E` / `!E`, `A and B` / `A & B`, `A - B` (A and not B), `A or B` / `A | B` /
//!   `A + B`, parentheses. `not` binds tightest, then `and` and `-`, then `or`.
//!
//! Matchers: `=text` equal, `~text` contains, `/regex/` regular expression (unanchored),
//! `#glob` glob (`*`, `?`, `[abc]`, anchored at both ends). A bad expression is an error that
//! points at the offending character.

use std::fmt;

/// What an expression is matched against: one test and where it comes from.
#[derive(Clone, Copy, Debug)]
pub struct TestMeta<'a> {
    /// The test's name in its binary.
    pub name: &'a str,
    /// The binary's target name.
    pub binary: &'a str,
    /// The binary's id (`my-pkg`, `my-pkg::integration`, `my-pkg::bin/name`).
    pub binary_id: &'a str,
    /// The package's name.
    pub package: &'a str,
    /// The target kind (`lib`, `test`, `bin`, `example`, `bench`, `proc-macro`).
    pub kind: &'a str,
}

/// A parsed filter expression.
#[derive(Clone, Debug)]
pub struct Filter {
    source: String,
    expr: Expr,
}

#[derive(Clone, Debug)]
enum Expr {
    All,
    None,
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Atom(Field, Matcher),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Test,
    Binary,
    BinaryId,
    Package,
    Kind,
}

#[derive(Clone, Debug)]
enum Matcher {
    Equal(String),
    Contains(String),
    Regex(regex_lite::Regex),
    Glob(regex_lite::Regex),
}

/// A filter expression that does not parse, with the character it stopped at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterError {
    /// The expression as given.
    pub expr: String,
    /// The offending character's position (in characters from the start).
    pub at: usize,
    /// What is wrong there.
    pub message: String,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self
            .expr
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        write!(
            f,
            "invalid filter expression: {} (at character {})\n    {shown}\n    {}^",
            self.message,
            self.at + 1,
            " ".repeat(self.at)
        )
    }
}

impl std::error::Error for FilterError {}

impl Filter {
    /// Parses `source`.
    pub fn parse(source: &str) -> Result<Filter, FilterError> {
        let mut parser = Parser {
            chars: source.chars().collect(),
            pos: 0,
            source,
        };
        parser.skip_space();
        if parser.at_end() {
            return Err(parser.error("the expression is empty"));
        }
        let expr = parser.or()?;
        parser.skip_space();
        if !parser.at_end() {
            return Err(parser.error(
                "expected an operator (`and`, `or`, `not`, `&`, `|`, `!`, `-`) or the end",
            ));
        }
        Ok(Filter {
            source: source.to_owned(),
            expr,
        })
    }

    /// The expression as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the test matches.
    pub fn matches(&self, test: &TestMeta<'_>) -> bool {
        eval(&self.expr, test)
    }
}

fn eval(expr: &Expr, test: &TestMeta<'_>) -> bool {
    match expr {
        Expr::All => true,
        Expr::None => false,
        Expr::Not(e) => !eval(e, test),
        Expr::And(a, b) => eval(a, test) && eval(b, test),
        Expr::Or(a, b) => eval(a, test) || eval(b, test),
        Expr::Atom(field, matcher) => {
            let value = match field {
                Field::Test => test.name,
                Field::Binary => test.binary,
                Field::BinaryId => test.binary_id,
                Field::Package => test.package,
                Field::Kind => test.kind,
            };
            match matcher {
                Matcher::Equal(s) => value == s,
                Matcher::Contains(s) => value.contains(s.as_str()),
                Matcher::Regex(r) | Matcher::Glob(r) => r.is_match(value),
            }
        }
    }
}

struct Parser<'s> {
    chars: Vec<char>,
    pos: usize,
    source: &'s str,
}

impl Parser<'_> {
    fn error(&self, message: &str) -> FilterError {
        FilterError {
            expr: self.source.to_owned(),
            at: self.pos.min(self.chars.len()),
            message: message.to_owned(),
        }
    }

    fn error_at(&self, at: usize, message: String) -> FilterError {
        FilterError {
            expr: self.source.to_owned(),
            at,
            message,
        }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// A word at the current position (letters, digits, `_`), without consuming it.
    fn word(&self) -> String {
        self.chars[self.pos..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
            .collect()
    }

    /// Consumes the keyword `kw` when it stands alone at the current position.
    fn keyword(&mut self, kw: &str) -> bool {
        if self.word() == kw {
            self.pos += kw.len();
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.and()?;
        loop {
            self.skip_space();
            let matched = match self.peek() {
                Some('|') | Some('+') => {
                    self.pos += 1;
                    true
                }
                _ => self.keyword("or"),
            };
            if !matched {
                return Ok(left);
            }
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.unary()?;
        loop {
            self.skip_space();
            let negate = match self.peek() {
                Some('&') => {
                    self.pos += 1;
                    false
                }
                Some('-') => {
                    self.pos += 1;
                    true
                }
                _ if self.keyword("and") => false,
                _ => return Ok(left),
            };
            let right = self.unary()?;
            let right = if negate {
                Expr::Not(Box::new(right))
            } else {
                right
            };
            left = Expr::And(Box::new(left), Box::new(right));
        }
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        self.skip_space();
        if self.peek() == Some('!') {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.keyword("not") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, FilterError> {
        self.skip_space();
        match self.peek() {
            None => return Err(self.error("expected a filter such as `test(name)` here")),
            Some('(') => {
                self.pos += 1;
                let inner = self.or()?;
                self.skip_space();
                if self.peek() != Some(')') {
                    return Err(self.error("expected `)` to close the parenthesis"));
                }
                self.pos += 1;
                return Ok(inner);
            }
            Some(_) => {}
        }
        let start = self.pos;
        let name = self.word();
        if name.is_empty() {
            return Err(self.error(
                "expected a filter such as `test(name)`, `package(name)`, `all()`, `not` or `(`",
            ));
        }
        let field = match name.as_str() {
            "test" => Some(Field::Test),
            "binary" => Some(Field::Binary),
            "binary_id" => Some(Field::BinaryId),
            "package" => Some(Field::Package),
            "kind" => Some(Field::Kind),
            "all" | "none" => None,
            _ => {
                return Err(self.error_at(
                    start,
                    format!(
                        "unknown filter `{name}`: expected test(), binary(), binary_id(), package(), kind(), all() or none()"
                    ),
                ));
            }
        };
        self.pos += name.len();
        self.skip_space();
        if self.peek() != Some('(') {
            return Err(self.error(&format!("expected `(` after `{name}`")));
        }
        self.pos += 1;
        let Some(field) = field else {
            self.skip_space();
            if self.peek() != Some(')') {
                return Err(self.error(&format!("`{name}()` takes no argument: expected `)`")));
            }
            self.pos += 1;
            return Ok(if name == "all" { Expr::All } else { Expr::None });
        };
        let matcher = self.matcher(field)?;
        Ok(Expr::Atom(field, matcher))
    }

    /// The argument of a filter up to and including its `)`.
    fn matcher(&mut self, field: Field) -> Result<Matcher, FilterError> {
        self.skip_space();
        let start = self.pos;
        if self.peek() == Some('/') {
            // A regex runs to the next `/` that is not escaped.
            self.pos += 1;
            let mut pattern = String::new();
            loop {
                match self.peek() {
                    None => {
                        return Err(
                            self.error_at(start, "this regex has no closing `/`".to_owned())
                        );
                    }
                    Some('\\') if self.chars.get(self.pos + 1) == Some(&'/') => {
                        pattern.push('/');
                        self.pos += 2;
                    }
                    Some('/') => {
                        self.pos += 1;
                        break;
                    }
                    Some(c) => {
                        pattern.push(c);
                        self.pos += 1;
                    }
                }
            }
            self.skip_space();
            if self.peek() != Some(')') {
                return Err(self.error("expected `)` after the regex"));
            }
            self.pos += 1;
            let regex = regex_lite::Regex::new(&pattern)
                .map_err(|e| self.error_at(start, format!("invalid regex `{pattern}`: {e}")))?;
            return Ok(Matcher::Regex(regex));
        }
        let mut text = String::new();
        loop {
            match self.peek() {
                None => return Err(self.error("expected `)` to close the filter")),
                Some(')') => {
                    self.pos += 1;
                    break;
                }
                Some('(') => {
                    return Err(self.error(
                        "`(` inside a filter's argument: write it as a regex, such as /a\\(b/",
                    ));
                }
                Some(c) => {
                    text.push(c);
                    self.pos += 1;
                }
            }
        }
        let text = text.trim().to_owned();
        let (kind, rest) = match text.chars().next() {
            Some('=') => ('=', text[1..].to_owned()),
            Some('~') => ('~', text[1..].to_owned()),
            Some('#') => ('#', text[1..].to_owned()),
            _ => (
                match field {
                    Field::Test => '~',
                    Field::Kind => '=',
                    _ => '#',
                },
                text.clone(),
            ),
        };
        if rest.is_empty() && kind != '~' {
            return Err(self.error_at(start, "this filter needs a value".to_owned()));
        }
        Ok(match kind {
            '=' => Matcher::Equal(rest),
            '~' => Matcher::Contains(rest),
            _ => {
                let regex = glob_regex(&rest)
                    .map_err(|e| self.error_at(start, format!("invalid glob `{rest}`: {e}")))?;
                Matcher::Glob(regex)
            }
        })
    }
}

/// A glob as an anchored regex: `*` any run, `?` one character, `[...]` a class.
fn glob_regex(glob: &str) -> Result<regex_lite::Regex, String> {
    let mut re = String::from("^");
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            '[' => {
                let mut class = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == ']' {
                        closed = true;
                        break;
                    }
                    class.push(c);
                }
                if !closed || class.is_empty() {
                    return Err("a `[` without its `]`".to_owned());
                }
                let class = class.replace('\\', "\\\\");
                let class = match class.strip_prefix('!') {
                    Some(rest) => format!("^{rest}"),
                    None => class,
                };
                re.push('[');
                re.push_str(&class);
                re.push(']');
            }
            _ => re.push_str(&regex_lite::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex_lite::Regex::new(&re).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta<'a>(name: &'a str, package: &'a str, binary: &'a str, kind: &'a str) -> TestMeta<'a> {
        TestMeta {
            name,
            binary,
            binary_id: "",
            package,
            kind,
        }
    }

    fn m(expr: &str, t: &TestMeta<'_>) -> bool {
        Filter::parse(expr).unwrap().matches(t)
    }

    #[test]
    fn functions_matchers_and_operators() {
        let t = meta("parse::empty_input", "my-pkg", "integration", "test");
        assert!(m("test(empty)", &t));
        assert!(!m("test(=empty)", &t));
        assert!(m("test(=parse::empty_input)", &t));
        assert!(m("test(/^parse::.*_input$/)", &t));
        assert!(m("test(#parse::*)", &t));
        assert!(!m("test(#empty*)", &t), "globs are anchored");
        assert!(m("package(my-*)", &t), "package() globs by default");
        assert!(!m("package(my)", &t));
        assert!(m("kind(test) and binary(integration)", &t));
        assert!(m("kind(lib) or binary(integ*)", &t));
        assert!(m("all() - kind(lib)", &t));
        assert!(!m("all() - kind(test)", &t));
        assert!(m("!none()", &t));
        assert!(m("not (kind(lib) | package(other))", &t));
        assert!(!m("none() | none() & all()", &t), "& binds tighter than |");
        assert!(m("test(a) + all()", &t));
        assert!(m("test([pq]arse::*)", &t) || m("test(#[pq]arse::*)", &t));
    }

    #[test]
    fn errors_point_at_the_offending_character() {
        let e = Filter::parse("test(a) andd test(b)").unwrap_err();
        assert_eq!(e.at, 8, "{e}");
        assert!(e.to_string().contains("expected an operator"), "{e}");
        let e = Filter::parse("tset(a)").unwrap_err();
        assert_eq!(e.at, 0);
        assert!(e.message.contains("unknown filter `tset`"), "{e}");
        let e = Filter::parse("test(a) & (package(b)").unwrap_err();
        assert_eq!(e.at, 21, "{e}");
        let e = Filter::parse("test(/a(/)").unwrap_err();
        assert_eq!(e.at, 5, "{e}");
        assert!(e.message.contains("invalid regex"), "{e}");
        let e = Filter::parse("").unwrap_err();
        assert!(e.message.contains("empty"));
        let e = Filter::parse("all(x)").unwrap_err();
        assert_eq!(e.at, 4, "{e}");
        let shown = Filter::parse("kind(lib) |").unwrap_err().to_string();
        assert!(
            shown.ends_with("\n    kind(lib) |\n               ^"),
            "{shown}"
        );
    }
}
