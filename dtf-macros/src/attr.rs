//! The options inside `#[dtf::test(...)]`, and the `#[ignore]` / `#[should_panic]` attributes
//! written on the same function.

use proc_macro2::TokenStream;
use syn::ext::IdentExt;
use syn::meta::ParseNestedMeta;
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Attribute, Error, Expr, ExprLit, Ident, Lit, LitStr, Meta, Result, Token};

use crate::parse;

/// The option names, in the order error messages list them.
const OPTION_NAMES: &str =
    "timeout, env, isolation, retries, memory, flavor, worker_threads, start_paused, spawn";

/// Each isolation level's spelling in the attribute and its `Isolation` variant.
const ISOLATION_LEVELS: [(&str, &str); 4] = [
    ("process", "Process"),
    ("env", "Env"),
    ("full", "Full"),
    ("full-or-env", "FullOrEnv"),
];

/// The options of `#[dtf::test(...)]`, checked and converted to what the generated code needs.
#[derive(Default)]
pub(crate) struct Options {
    /// `timeout = "..."`, in nanoseconds.
    pub(crate) timeout_nanos: Option<u64>,
    /// `env(NAME = "value", ...)`, in the order written.
    pub(crate) env: Option<Vec<(String, String)>>,
    /// `isolation = "..."`, as the name of an `Isolation` variant.
    pub(crate) isolation: Option<&'static str>,
    /// `retries = N`.
    pub(crate) retries: Option<u32>,
    /// `memory = "..."`, in bytes.
    pub(crate) memory_bytes: Option<u64>,
    /// `flavor = "current_thread" | "multi_thread"` of an `async fn` test's runtime, with the
    /// span of its value; `true` for `multi_thread`.
    pub(crate) multi_thread: Option<(bool, proc_macro2::Span)>,
    /// `worker_threads = N` of a multi-thread runtime, with its span.
    pub(crate) worker_threads: Option<(usize, proc_macro2::Span)>,
    /// `start_paused = true|false` of a current-thread runtime, with its span.
    pub(crate) start_paused: Option<(bool, proc_macro2::Span)>,
    /// `spawn = "..."`, as the name of a `Spawn` variant.
    pub(crate) spawn: Option<&'static str>,
}

impl Options {
    /// Parses the tokens between the parentheses of `#[dtf::test(...)]`.
    pub(crate) fn parse(args: TokenStream) -> Result<Options> {
        let mut options = Options::default();
        syn::meta::parser(|meta| options.parse_option(&meta)).parse2(args)?;
        Ok(options)
    }

    fn parse_option(&mut self, meta: &ParseNestedMeta) -> Result<()> {
        let name = meta.path.get_ident().map(Ident::to_string);
        let already_set = match name.as_deref() {
            Some("timeout") => self.timeout_nanos.is_some(),
            Some("env") => self.env.is_some(),
            Some("isolation") => self.isolation.is_some(),
            Some("retries") => self.retries.is_some(),
            Some("memory") => self.memory_bytes.is_some(),
            Some("flavor") => self.multi_thread.is_some(),
            Some("worker_threads") => self.worker_threads.is_some(),
            Some("start_paused") => self.start_paused.is_some(),
            Some("spawn") => self.spawn.is_some(),
            Some(marker @ ("ignore" | "should_panic")) => {
                return Err(meta.error(format!(
                    "`{marker}` is not an option of `#[dtf::test]`: \
                     write `#[{marker}]` as a separate attribute below `#[dtf::test]`"
                )));
            }
            _ => {
                let path = meta.path.segments.iter();
                let written: Vec<String> = path.map(|s| s.ident.to_string()).collect();
                return Err(meta.error(format!(
                    "unknown option `{}`: expected one of {OPTION_NAMES}",
                    written.join("::")
                )));
            }
        };
        if already_set {
            return Err(Error::new_spanned(
                &meta.path,
                format!("duplicate option `{}`", name.unwrap_or_default()),
            ));
        }
        match name.as_deref() {
            Some("timeout") => {
                let text = string_value(meta, "timeout", r#"timeout = "2s""#)?;
                let nanos = parse::duration_nanos(&text.value()).map_err(|reason| {
                    let message = format!("invalid timeout {:?}: {reason}", text.value());
                    Error::new(text.span(), message)
                })?;
                self.timeout_nanos = Some(nanos);
            }
            Some("env") => self.env = Some(env_value(meta)?),
            Some("isolation") => {
                let text = string_value(meta, "isolation", r#"isolation = "process""#)?;
                let value = text.value();
                let level = ISOLATION_LEVELS
                    .iter()
                    .find(|(spelling, _)| *spelling == value)
                    .map(|(_, variant)| *variant)
                    .ok_or_else(|| {
                        let message = format!(
                            r#"unknown isolation level {value:?}: expected one of "process", "env", "full", "full-or-env""#
                        );
                        Error::new(text.span(), message)
                    })?;
                self.isolation = Some(level);
            }
            Some("retries") => self.retries = Some(retries_value(meta)?),
            Some("flavor") => {
                let text = string_value(meta, "flavor", r#"flavor = "multi_thread""#)?;
                let multi = match text.value().as_str() {
                    "current_thread" => false,
                    "multi_thread" => true,
                    other => {
                        let message = format!(
                            r#"unknown runtime flavor {other:?}: expected "current_thread" or "multi_thread""#
                        );
                        return Err(Error::new(text.span(), message));
                    }
                };
                self.multi_thread = Some((multi, text.span()));
            }
            Some("worker_threads") => self.worker_threads = Some(worker_threads_value(meta)?),
            Some("start_paused") => self.start_paused = Some(bool_value(meta, "start_paused")?),
            Some("spawn") => {
                let text = string_value(meta, "spawn", r#"spawn = "exec""#)?;
                self.spawn = Some(match text.value().as_str() {
                    "fork" => "Fork",
                    "exec" => "Exec",
                    value => {
                        let message =
                            format!(r#"unknown spawn mode {value:?}: expected "fork" or "exec""#);
                        return Err(Error::new(text.span(), message));
                    }
                });
            }
            _ => self.memory_bytes = Some(memory_value(meta)?),
        }
        Ok(())
    }

    /// Checks the runtime options against each other and against the function: they describe
    /// the tokio runtime of an `async fn` test, with the rules of `#[tokio::test]`.
    pub(crate) fn check_runtime(&self, is_async: bool) -> Result<()> {
        let mut errors: Vec<Error> = Vec::new();
        let given = [
            ("flavor", self.multi_thread.map(|(_, span)| span)),
            ("worker_threads", self.worker_threads.map(|(_, span)| span)),
            ("start_paused", self.start_paused.map(|(_, span)| span)),
        ];
        if !is_async {
            for (name, span) in given {
                if let Some(span) = span {
                    let message = format!(
                        "`{name}` configures the tokio runtime of an `async fn` test, \
                         but this test is not `async`"
                    );
                    errors.push(Error::new(span, message));
                }
            }
        } else {
            let multi = self.multi_thread.is_some_and(|(multi, _)| multi);
            if let (Some((_, span)), false) = (self.worker_threads, multi) {
                errors.push(Error::new(
                    span,
                    r#"`worker_threads` needs the multi-thread runtime: add `flavor = "multi_thread"`"#,
                ));
            }
            if let (Some((true, span)), true) = (self.start_paused, multi) {
                errors.push(Error::new(
                    span,
                    r#"`start_paused = true` needs the current-thread runtime: remove `flavor = "multi_thread"`"#,
                ));
            }
        }
        match errors.into_iter().reduce(|mut all, error| {
            all.combine(error);
            all
        }) {
            Some(errors) => Err(errors),
            None => Ok(()),
        }
    }
}

/// Parses `= N` after `worker_threads`: a whole number greater than zero.
fn worker_threads_value(meta: &ParseNestedMeta) -> Result<(usize, proc_macro2::Span)> {
    const EXAMPLE: &str = "worker_threads = 2";
    match option_value(meta, "worker_threads", EXAMPLE)? {
        Expr::Lit(ExprLit {
            lit: Lit::Int(count),
            ..
        }) if count.suffix().is_empty() => match count.base10_parse::<usize>() {
            Ok(0) => Err(Error::new(
                count.span(),
                "`worker_threads` must be greater than zero",
            )),
            Ok(n) => Ok((n, count.span())),
            Err(_) => Err(Error::new(count.span(), "`worker_threads` is too large")),
        },
        other => Err(Error::new_spanned(
            other,
            format!("`worker_threads` must be a positive integer, as in `{EXAMPLE}`"),
        )),
    }
}

/// Parses `= true` or `= false` after an option name.
fn bool_value(meta: &ParseNestedMeta, name: &str) -> Result<(bool, proc_macro2::Span)> {
    let example = format!("{name} = true");
    match option_value(meta, name, &example)? {
        Expr::Lit(ExprLit {
            lit: Lit::Bool(value),
            ..
        }) => Ok((value.value, value.span)),
        other => Err(Error::new_spanned(
            other,
            format!("`{name}` must be `true` or `false`, as in `{example}`"),
        )),
    }
}

/// Parses `= <expression>` after an option name, with a clear error when the `=` is missing.
fn option_value(meta: &ParseNestedMeta, name: &str, example: &str) -> Result<Expr> {
    if !meta.input.peek(Token![=]) {
        return Err(meta.error(format!("`{name}` needs a value, as in `{example}`")));
    }
    meta.value()?.parse()
}

/// Parses `= "string"` after an option name.
fn string_value(meta: &ParseNestedMeta, name: &str, example: &str) -> Result<LitStr> {
    match option_value(meta, name, example)? {
        Expr::Lit(ExprLit {
            lit: Lit::Str(text),
            ..
        }) => Ok(text),
        other => Err(Error::new_spanned(
            other,
            format!("`{name}` must be a string literal, as in `{example}`"),
        )),
    }
}

/// Parses `= N` after `retries`.
fn retries_value(meta: &ParseNestedMeta) -> Result<u32> {
    const EXAMPLE: &str = "retries = 2";
    match option_value(meta, "retries", EXAMPLE)? {
        Expr::Lit(ExprLit {
            lit: Lit::Int(count),
            ..
        }) if count.suffix().is_empty() => count
            .base10_parse()
            .map_err(|_| Error::new(count.span(), "`retries` is too large: at most 4294967295")),
        other => Err(Error::new_spanned(
            other,
            format!("`retries` must be a non-negative integer, as in `{EXAMPLE}`"),
        )),
    }
}

/// Parses `= "512MiB"` or `= 1048576` (bytes) after `memory`.
fn memory_value(meta: &ParseNestedMeta) -> Result<u64> {
    const EXAMPLE: &str = r#"memory = "512MiB""#;
    let (text, span) = match option_value(meta, "memory", EXAMPLE)? {
        Expr::Lit(ExprLit {
            lit: Lit::Str(text),
            ..
        }) => (text.value(), text.span()),
        Expr::Lit(ExprLit {
            lit: Lit::Int(bytes),
            ..
        }) if bytes.suffix().is_empty() => (bytes.base10_digits().to_owned(), bytes.span()),
        other => {
            return Err(Error::new_spanned(
                other,
                format!(
                    "`memory` must be a string literal such as `{EXAMPLE}`, or a number of bytes"
                ),
            ));
        }
    };
    parse::size_bytes(&text)
        .map_err(|reason| Error::new(span, format!("invalid memory size {text:?}: {reason}")))
}

/// Parses `(NAME = "value", ...)` after `env`.
fn env_value(meta: &ParseNestedMeta) -> Result<Vec<(String, String)>> {
    if !meta.input.peek(syn::token::Paren) {
        return Err(meta.error(r#"`env` needs a list of variables, as in `env(NAME = "value")`"#));
    }
    let content;
    syn::parenthesized!(content in meta.input);
    let entries = Punctuated::<EnvEntry, Token![,]>::parse_terminated(&content)?;
    let mut env: Vec<(String, String)> = Vec::with_capacity(entries.len());
    for entry in entries {
        if env.iter().any(|(name, _)| *name == entry.name) {
            let message = format!("duplicate environment variable `{}`", entry.name);
            return Err(Error::new(entry.name_span, message));
        }
        env.push((entry.name, entry.value));
    }
    Ok(env)
}

/// One `NAME = "value"` of `env(...)`. The name is an identifier, or a string literal for names
/// that are not identifiers.
struct EnvEntry {
    name: String,
    name_span: proc_macro2::Span,
    value: String,
}

impl Parse for EnvEntry {
    fn parse(input: ParseStream) -> Result<Self> {
        let (name, name_span) = if input.peek(LitStr) {
            let name: LitStr = input.parse()?;
            (name.value(), name.span())
        } else if input.peek(Ident::peek_any) {
            let name = Ident::parse_any(input)?;
            (name.unraw().to_string(), name.span())
        } else {
            return Err(input
                .error(r#"expected an environment variable name, as in `env(NAME = "value")`"#));
        };
        if name.is_empty() || name.contains(['=', '\0']) {
            let message = format!(
                "invalid environment variable name {name:?}: \
                 it must be non-empty and contain neither `=` nor NUL"
            );
            return Err(Error::new(name_span, message));
        }
        if !input.peek(Token![=]) {
            let message = format!(r#"expected `= "value"` after `{name}`"#);
            return Err(Error::new(name_span, message));
        }
        input.parse::<Token![=]>()?;
        let value = match input.parse::<Expr>()? {
            Expr::Lit(ExprLit {
                lit: Lit::Str(value),
                ..
            }) => value,
            other => {
                let message = format!(
                    r#"the value of `{name}` must be a string literal, as in `{name} = "1"`"#
                );
                return Err(Error::new_spanned(other, message));
            }
        };
        if value.value().contains('\0') {
            let message = format!("the value of `{name}` cannot contain NUL");
            return Err(Error::new(value.span(), message));
        }
        let value = value.value();
        Ok(EnvEntry {
            name,
            name_span,
            value,
        })
    }
}

/// `#[ignore]` and `#[should_panic]` as written on the test function.
#[derive(Default)]
pub(crate) struct Markers {
    /// `Some(None)` for `#[ignore]`, `Some(Some(reason))` for `#[ignore = "reason"]`.
    pub(crate) ignore: Option<Option<String>>,
    /// `Some(None)` for `#[should_panic]`, `Some(Some(text))` when an expected text is given.
    pub(crate) should_panic: Option<Option<String>>,
}

impl Markers {
    /// Removes `#[ignore]` and `#[should_panic]` from `attrs` and returns what they said. Every
    /// other attribute stays.
    pub(crate) fn take(attrs: &mut Vec<Attribute>) -> Result<Markers> {
        let mut markers = Markers::default();
        let mut kept = Vec::with_capacity(attrs.len());
        for attr in std::mem::take(attrs) {
            let (slot, value) = if attr.path().is_ident("ignore") {
                (&mut markers.ignore, ignore_value(&attr)?)
            } else if attr.path().is_ident("should_panic") {
                (&mut markers.should_panic, should_panic_value(&attr)?)
            } else {
                kept.push(attr);
                continue;
            };
            if slot.is_some() {
                let name = attr.path().get_ident().map(Ident::to_string);
                let message = format!("duplicate `#[{}]` attribute", name.unwrap_or_default());
                return Err(Error::new_spanned(&attr, message));
            }
            *slot = Some(value);
        }
        *attrs = kept;
        Ok(markers)
    }
}

/// The reason of `#[ignore]` or `#[ignore = "reason"]`.
fn ignore_value(attr: &Attribute) -> Result<Option<String>> {
    match &attr.meta {
        Meta::Path(_) => Ok(None),
        Meta::NameValue(name_value) => match &name_value.value {
            Expr::Lit(ExprLit {
                lit: Lit::Str(reason),
                ..
            }) => Ok(Some(reason.value())),
            other => Err(Error::new_spanned(
                other,
                r#"the reason of `#[ignore]` must be a string literal, as in `#[ignore = "needs network"]`"#,
            )),
        },
        Meta::List(_) => Err(Error::new_spanned(
            attr,
            r#"malformed `#[ignore]`: expected `#[ignore]` or `#[ignore = "reason"]`"#,
        )),
    }
}

/// The expected text of `#[should_panic]`, `#[should_panic = "text"]` or
/// `#[should_panic(expected = "text")]`.
fn should_panic_value(attr: &Attribute) -> Result<Option<String>> {
    const FORMS: &str = r#"expected `#[should_panic]` or `#[should_panic(expected = "text")]`"#;
    match &attr.meta {
        Meta::Path(_) => Ok(None),
        Meta::NameValue(name_value) => match &name_value.value {
            Expr::Lit(ExprLit {
                lit: Lit::Str(text),
                ..
            }) => Ok(Some(text.value())),
            other => Err(Error::new_spanned(
                other,
                format!("malformed `#[should_panic]`: {FORMS}"),
            )),
        },
        Meta::List(list) => {
            let mut expected: Option<LitStr> = None;
            list.parse_nested_meta(|meta| {
                if !meta.path.is_ident("expected") {
                    return Err(
                        meta.error(format!("unknown argument of `#[should_panic]`: {FORMS}"))
                    );
                }
                if expected.is_some() {
                    return Err(meta.error("duplicate `expected` in `#[should_panic]`"));
                }
                expected = Some(string_value(&meta, "expected", r#"expected = "text""#)?);
                Ok(())
            })?;
            match expected {
                Some(text) => Ok(Some(text.value())),
                None => Err(Error::new_spanned(
                    attr,
                    format!("malformed `#[should_panic]`: {FORMS}"),
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn error(args: TokenStream) -> String {
        match Options::parse(args) {
            Ok(_) => panic!("expected an error"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn parses_every_option() {
        let options = Options::parse(quote!(
            timeout = "1.5s",
            env(FOO = "bar", "odd.name" = "1", r#type = ""),
            isolation = "full-or-env",
            retries = 3,
            memory = "1KiB",
            spawn = "exec",
        ))
        .expect("valid options");
        assert_eq!(options.timeout_nanos, Some(1_500_000_000));
        let env: Vec<(&str, &str)> = options
            .env
            .iter()
            .flatten()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        assert_eq!(env, [("FOO", "bar"), ("odd.name", "1"), ("type", "")]);
        assert_eq!(options.isolation, Some("FullOrEnv"));
        assert_eq!(options.retries, Some(3));
        assert_eq!(options.memory_bytes, Some(1024));
        assert_eq!(options.spawn, Some("Exec"));
    }

    #[test]
    fn empty_arguments_set_nothing() {
        let options = Options::parse(TokenStream::new()).expect("no options");
        assert!(options.timeout_nanos.is_none() && options.env.is_none());
        assert!(options.isolation.is_none() && options.retries.is_none());
        assert!(options.memory_bytes.is_none());
    }

    #[test]
    fn memory_accepts_a_plain_number_of_bytes() {
        let options = Options::parse(quote!(memory = 4096)).expect("valid");
        assert_eq!(options.memory_bytes, Some(4096));
    }

    #[test]
    fn reports_bad_options() {
        assert_eq!(
            error(quote!(timout = "1s")),
            "unknown option `timout`: expected one of timeout, env, isolation, retries, memory, flavor, worker_threads, start_paused, spawn"
        );
        assert_eq!(
            error(quote!(timeout = "5 parsecs")),
            r#"invalid timeout "5 parsecs": expected a number followed by a unit such as "500ms", "2s", "1m""#
        );
        assert_eq!(
            error(quote!(timeout = "1s", timeout = "2s")),
            "duplicate option `timeout`"
        );
        assert_eq!(
            error(quote!(timeout = 5)),
            r#"`timeout` must be a string literal, as in `timeout = "2s"`"#
        );
        assert_eq!(
            error(quote!(timeout)),
            r#"`timeout` needs a value, as in `timeout = "2s"`"#
        );
        assert_eq!(
            error(quote!(isolation = "none")),
            r#"unknown isolation level "none": expected one of "process", "env", "full", "full-or-env""#
        );
        assert_eq!(
            error(quote!(retries = -1)),
            "`retries` must be a non-negative integer, as in `retries = 2`"
        );
        assert_eq!(
            error(quote!(retries = 4294967296)),
            "`retries` is too large: at most 4294967295"
        );
        assert!(
            error(quote!(memory = "12 parsecs")).starts_with(r#"invalid memory size "12 parsecs""#)
        );
        assert_eq!(
            error(quote!(env(FOO = 1))),
            r#"the value of `FOO` must be a string literal, as in `FOO = "1"`"#
        );
        assert_eq!(
            error(quote!(env(FOO = "a\0b"))),
            "the value of `FOO` cannot contain NUL"
        );
        assert_eq!(
            error(quote!(env("A=B" = "1"))),
            r#"invalid environment variable name "A=B": it must be non-empty and contain neither `=` nor NUL"#
        );
        assert_eq!(
            error(quote!(env(FOO = "1", FOO = "2"))),
            "duplicate environment variable `FOO`"
        );
        assert_eq!(
            error(quote!(env = "FOO")),
            r#"`env` needs a list of variables, as in `env(NAME = "value")`"#
        );
        assert!(error(quote!(ignore)).starts_with("`ignore` is not an option"));
        assert_eq!(
            error(quote!(flavor = "multi")),
            r#"unknown runtime flavor "multi": expected "current_thread" or "multi_thread""#
        );
        assert_eq!(
            error(quote!(worker_threads = 0)),
            "`worker_threads` must be greater than zero"
        );
        assert_eq!(
            error(quote!(start_paused = 1)),
            "`start_paused` must be `true` or `false`, as in `start_paused = true`"
        );
    }

    fn markers(attrs: TokenStream) -> Result<(Markers, Vec<Attribute>)> {
        let mut attrs = Attribute::parse_outer.parse2(attrs)?;
        let markers = Markers::take(&mut attrs)?;
        Ok((markers, attrs))
    }

    #[test]
    fn takes_markers_and_keeps_other_attributes() {
        let (found, kept) = markers(quote! {
            /// Docs.
            #[ignore = "slow"]
            #[allow(unused)]
            #[should_panic(expected = "boom")]
        })
        .expect("valid markers");
        assert_eq!(found.ignore, Some(Some("slow".to_owned())));
        assert_eq!(found.should_panic, Some(Some("boom".to_owned())));
        assert_eq!(kept.len(), 2);

        let (found, kept) = markers(quote!(#[ignore] #[should_panic])).expect("valid markers");
        assert_eq!(found.ignore, Some(None));
        assert_eq!(found.should_panic, Some(None));
        assert!(kept.is_empty());

        let (found, _) = markers(quote!(#[should_panic = "boom"])).expect("valid markers");
        assert_eq!(found.should_panic, Some(Some("boom".to_owned())));
    }

    #[test]
    fn reports_bad_markers() {
        let error = |attrs| match markers(attrs) {
            Ok(_) => panic!("expected an error"),
            Err(error) => error.to_string(),
        };
        assert_eq!(
            error(quote!(#[should_panic(foo)])),
            r#"unknown argument of `#[should_panic]`: expected `#[should_panic]` or `#[should_panic(expected = "text")]`"#
        );
        assert_eq!(
            error(quote!(#[should_panic()])),
            r#"malformed `#[should_panic]`: expected `#[should_panic]` or `#[should_panic(expected = "text")]`"#
        );
        assert_eq!(
            error(quote!(#[ignore(reason)])),
            r#"malformed `#[ignore]`: expected `#[ignore]` or `#[ignore = "reason"]`"#
        );
        assert_eq!(
            error(quote!(#[ignore] #[ignore])),
            "duplicate `#[ignore]` attribute"
        );
    }
}
