//! Procedural macros for [dtf](https://docs.rs/dtf): the `#[dtf::test]` attribute.
//!
//! Use this crate through `dtf`, which re-exports the attribute as `dtf::test`; the generated
//! code refers to `::dtf`, so the crate that uses the attribute must depend on `dtf`.

#![warn(missing_docs)]

mod attr;
mod parse;

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::spanned::Spanned;
use syn::{Attribute, Error, Item, ItemFn, ReturnType, Safety, Signature, Visibility};

use crate::attr::{Markers, Options};

/// Marks a function as a dtf test, which runs in a process of its own.
///
/// It accepts what std's `#[test]` accepts:
///
/// ```ignore
/// #[dtf::test]
/// fn plain() {}
///
/// #[dtf::test]
/// #[ignore = "needs network"]
/// fn with_reason() {}
///
/// #[dtf::test]
/// #[should_panic(expected = "boom")]
/// fn panics() {
///     panic!("boom!")
/// }
///
/// #[dtf::test]
/// fn fallible() -> Result<(), Box<dyn std::error::Error>> {
///     Ok(())
/// }
/// ```
///
/// An `async fn` runs on a current-thread tokio runtime of its own:
///
/// ```ignore
/// #[dtf::test]
/// async fn on_tokio() {
///     tokio::task::yield_now().await;
/// }
/// ```
///
/// # Options
///
/// | option | example | meaning |
/// | --- | --- | --- |
/// | `timeout` | `timeout = "500ms"` | fail the test when it runs longer; a number (`2`, `1.5`) and a unit: `ns`, `us`, `ms`, `s`, `m`, `h` |
/// | `env` | `env(FOO = "bar", BAZ = "1")` | set these variables in the test's environment; a name that is not an identifier can be a string: `"odd.name" = "1"` |
/// | `isolation` | `isolation = "process"` | one of `"process"`, `"env"`, `"full"`, `"full-or-env"` |
/// | `retries` | `retries = 2` | run a failing test up to this many more times |
/// | `memory` | `memory = "512MiB"` | limit the test's memory; `B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB`, `TB`/`TiB` (`KB` = 1000, `KiB` = 1024), or a plain number of bytes |
///
/// ```ignore
/// #[dtf::test(timeout = "2s", env(A = "1"), isolation = "process")]
/// fn combined() {}
/// ```
///
/// Every value is checked at compile time: a malformed timeout or size, an unknown option or
/// isolation level, a duplicate option and an `env` value that is not a string are compile errors
/// that point at the offending token.
///
/// # Attribute order
///
/// `#[ignore]` and `#[should_panic]` may be written below `#[dtf::test]` (as with std's `#[test]`)
/// or above it; the attribute reads them and removes them from the function. Other attributes
/// (doc comments, `#[allow]`, `#[cfg]`, ...) stay on the function, and `#[cfg]` also applies to the
/// test's registration.
///
/// # What it generates
///
/// The function stays as written, under its own name, so other code can still call it. An
/// `async fn` becomes a plain `fn` with the same return type whose body is
/// `dtf::__private::block_on_runtime(RUNTIME, async move { ... })`. Next to the function, the
/// attribute registers a `dtf::__private::TestDef` through `inventory`, reached through dtf, so
/// the crate needs no dependency on `inventory` itself.
///
/// Generated code reaches dtf through `extern crate NAME as __dtf;` inside its own blocks, where
/// NAME is what the crate's `Cargo.toml` calls the `dtf-harness` package (`dtf` unless renamed,
/// as in `harnessx = { package = "dtf-harness", ... }`), so it resolves in every edition from
/// 2015 on and under a renamed dependency.
///
/// # Runtime options of `async fn` tests
///
/// | option | meaning |
/// | --- | --- |
/// | `flavor = "current_thread"` (default) or `"multi_thread"` | the kind of tokio runtime |
/// | `worker_threads = N` | worker threads of a `multi_thread` runtime |
/// | `start_paused = true` | tokio's clock starts paused (current-thread only) |
///
/// They mean what they mean in `#[tokio::test]`, and are compile errors on a test that is not
/// `async`.
///
/// # Restrictions
///
/// The test must be a free function without parameters, generic parameters or `unsafe`, and its
/// return type must implement `dtf::__private::TestReturn` (`()` or any `Result<T, E>` with
/// `E: Debug`). It cannot be an associated function of an `impl` block.
#[proc_macro_attribute]
pub fn test(
    args: proc_macro::TokenStream,
    item: proc_macro::TokenStream,
) -> proc_macro::TokenStream {
    let item = TokenStream::from(item);
    match expand(args.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        Err(error) => {
            let error = error.into_compile_error();
            let item = fallback(item);
            quote!(#error #item).into()
        }
    }
}

/// Marks a function as a warm-up: shared set-up that runs once, in the fork server, before its
/// first test is forked, so every test starts with a private copy-on-write copy of its result.
///
/// ```ignore
/// static TABLE: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
///
/// #[dtf::warm_up]
/// fn build_table() {
///     TABLE.get_or_init(|| (0..100_000).map(|i| i * i).collect());
/// }
/// ```
///
/// Warm-ups run in name order, each once. One that panics fails the run with its message
/// before any test starts. A warm-up must not start threads or open connections that tests
/// would share: the fork server refuses to fork after a warm-up leaves a thread running.
/// When tests start by exec (`DTF_SPAWN=exec`, other platforms), every test process runs the
/// warm-ups itself before its test.
///
/// The function must be a free function without parameters, generic parameters or `unsafe`,
/// returning `()`.
#[proc_macro_attribute]
pub fn warm_up(
    args: proc_macro::TokenStream,
    item: proc_macro::TokenStream,
) -> proc_macro::TokenStream {
    let item = TokenStream::from(item);
    match expand_warm_up(args.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        Err(error) => {
            let error = error.into_compile_error();
            quote!(#error #item).into()
        }
    }
}

fn expand_warm_up(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    if !args.is_empty() {
        return Err(Error::new_spanned(
            args,
            "`#[dtf::warm_up]` takes no options",
        ));
    }
    let function = match syn::parse2::<Item>(item.clone()) {
        Ok(Item::Fn(function)) => function,
        _ => {
            return Err(Error::new(
                item_keyword_span(item),
                "`#[dtf::warm_up]` can only be applied to a function",
            ));
        }
    };
    let sig = &function.sig;
    if sig.asyncness.is_some()
        || !matches!(sig.safety, Safety::Default)
        || !sig.generics.params.is_empty()
        || !sig.inputs.is_empty()
        || sig.variadic.is_some()
        || !matches!(sig.output, ReturnType::Default)
    {
        return Err(Error::new_spanned(
            sig,
            "a `#[dtf::warm_up]` function must be a plain `fn name()` without parameters, \
             generics, `async`, `unsafe` or a return type",
        ));
    }
    let ident = &sig.ident;
    let name = ident.unraw().to_string();
    let cfgs = function.attrs.iter().filter(|a| a.path().is_ident("cfg"));
    Ok(quote! {
        #function

        #(#cfgs)*
        ::dtf::__private::inventory::submit! {
            ::dtf::__private::WarmUp {
                module_path: ::core::module_path!(),
                name: #name,
                func: #ident,
            }
        }
    })
}

/// What to emit next to a compile error: the item itself, so that code using it gets no
/// follow-up errors, minus the `#[ignore]` and `#[should_panic]` that only tests may carry.
fn fallback(item: TokenStream) -> TokenStream {
    match syn::parse2::<ItemFn>(item.clone()) {
        Ok(mut function) => {
            function.attrs.retain(|attr| {
                !(attr.path().is_ident("ignore") || attr.path().is_ident("should_panic"))
            });
            quote!(#function)
        }
        Err(_) => item,
    }
}

/// Checks the attribute's arguments and the function, and generates the function plus its
/// registration.
fn expand(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let (options, mut function) = match (Options::parse(args), parse_function(item)) {
        (Ok(options), Ok(function)) => (options, function),
        (Err(mut first), Err(second)) => {
            first.combine(second);
            return Err(first);
        }
        (Err(error), Ok(_)) | (Ok(_), Err(error)) => return Err(error),
    };
    let markers = Markers::take(&mut function.attrs)?;
    options.check_runtime(function.sig.asyncness.is_some())?;
    let dtf = DtfCrate::find();
    let registration = registration(&function, &options, &markers, &dtf);
    if function.sig.asyncness.take().is_some() {
        let body = &function.block;
        let import = dtf.import();
        let runtime = runtime(&options);
        *function.block = syn::parse_quote!({
            #import
            __dtf::__private::block_on_runtime(#runtime, async move #body)
        });
    }
    Ok(quote! {
        #function
        #registration
    })
}

/// How the generated code reaches the `dtf` library from the user's crate.
///
/// Generated code never writes `::dtf::` or `::core::`: a leading `::` means the crate root in
/// edition 2015, and the dependency may be renamed in `Cargo.toml`
/// (`harnessx = { package = "dtf-harness", ... }`). Instead each generated block imports the
/// library under a private name with `extern crate NAME as __dtf;` (which resolves in every
/// edition), where NAME is read from the user's manifest by `proc-macro-crate`.
enum DtfCrate {
    /// The library itself is being compiled: `crate`.
    Itself,
    /// The name the user's crate knows the library by.
    Named(syn::Ident),
}

/// The published package; its library is called `dtf`.
const PACKAGE: &str = "dtf-harness";
/// The library's name, and the package name of a checkout's `dtf/` (path and git dependencies).
const LIBRARY: &str = "dtf";

impl DtfCrate {
    fn find() -> DtfCrate {
        use proc_macro_crate::{FoundCrate, crate_name};
        let found = crate_name(PACKAGE).or_else(|_| crate_name(LIBRARY));
        let name = match found {
            Ok(FoundCrate::Itself) => return DtfCrate::Itself,
            // proc-macro-crate reports an unrenamed dependency by its package name, but the
            // library is called `dtf`: `dtf-harness = "0.1"` is `dtf` in code.
            Ok(FoundCrate::Name(name)) if name == PACKAGE.replace('-', "_") => LIBRARY.to_owned(),
            Ok(FoundCrate::Name(name)) => name,
            // No manifest to read (rustc run by hand) or dtf reached through another crate's
            // re-export: the usual name.
            Err(_) => LIBRARY.to_owned(),
        };
        DtfCrate::Named(syn::Ident::new(&name, Span::call_site()))
    }

    /// An item that brings the library into scope as `__dtf`.
    fn import(&self) -> TokenStream {
        match self {
            DtfCrate::Itself => quote!(
                use crate as __dtf;
            ),
            DtfCrate::Named(name) => quote!(
                #[allow(unused_extern_crates, clippy::useless_attribute)]
                extern crate #name as __dtf;
            ),
        }
    }
}

/// The `dtf::__private::Runtime` of an `async fn` test, from its runtime options.
fn runtime(options: &Options) -> TokenStream {
    let multi_thread = options.multi_thread.is_some_and(|(multi, _)| multi);
    let worker_threads = match options.worker_threads {
        Some((n, _)) => quote!(__dtf::__private::core::option::Option::Some(#n)),
        None => quote!(__dtf::__private::core::option::Option::None),
    };
    let start_paused = options.start_paused.is_some_and(|(paused, _)| paused);
    quote!(__dtf::__private::Runtime {
        multi_thread: #multi_thread,
        worker_threads: #worker_threads,
        start_paused: #start_paused,
    })
}

/// Parses the item and checks that it can be a test.
fn parse_function(item: TokenStream) -> syn::Result<ItemFn> {
    match syn::parse2::<Item>(item.clone()) {
        Ok(Item::Fn(function)) => {
            check_signature(&function.sig)?;
            Ok(function)
        }
        _ => Err(Error::new(
            item_keyword_span(item),
            "`#[dtf::test]` can only be applied to a function",
        )),
    }
}

/// The span of the first token after the item's attributes and visibility, such as `struct`.
fn item_keyword_span(item: TokenStream) -> Span {
    let keyword = |input: ParseStream| {
        input.call(Attribute::parse_outer)?;
        input.parse::<Visibility>()?;
        let span = input.span();
        input.parse::<TokenStream>()?;
        Ok(span)
    };
    keyword.parse2(item).unwrap_or_else(|_| Span::call_site())
}

/// Rejects signatures a test cannot have; reports every problem at once.
fn check_signature(sig: &Signature) -> syn::Result<()> {
    let mut errors: Vec<Error> = Vec::new();
    if let Safety::Unsafe(unsafe_token) = &sig.safety {
        errors.push(Error::new(
            unsafe_token.span(),
            "`#[dtf::test]` functions cannot be `unsafe`",
        ));
    }
    if !sig.generics.params.is_empty() {
        errors.push(Error::new_spanned(
            &sig.generics,
            "`#[dtf::test]` functions cannot be generic",
        ));
    }
    if let Some(receiver) = sig.receiver() {
        errors.push(Error::new_spanned(
            receiver,
            "`#[dtf::test]` cannot be applied to methods: a test must be a free function",
        ));
    } else if !sig.inputs.is_empty() || sig.variadic.is_some() {
        let message = "`#[dtf::test]` functions cannot take parameters";
        errors.push(match &sig.variadic {
            Some(variadic) if sig.inputs.is_empty() => Error::new_spanned(variadic, message),
            _ => Error::new_spanned(&sig.inputs, message),
        });
    }
    match errors.into_iter().reduce(|mut all, error| {
        all.combine(error);
        all
    }) {
        Some(errors) => Err(errors),
        None => Ok(()),
    }
}

/// The `inventory::submit!` that registers the test's `TestDef`, and its libtest twin.
fn registration(
    function: &ItemFn,
    options: &Options,
    markers: &Markers,
    dtf: &DtfCrate,
) -> TokenStream {
    let ident = &function.sig.ident;
    let name = ident.unraw().to_string();
    let import = dtf.import();
    // A `#[cfg]` that removes the function must remove its registration too.
    let cfgs = function.attrs.iter().filter(|a| a.path().is_ident("cfg"));

    // Spanned at the return type, so that a type that is not a test result is reported there.
    let result_span = match &function.sig.output {
        ReturnType::Type(_, ty) => ty.span(),
        ReturnType::Default => ident.span(),
    };
    let result = quote_spanned! {result_span=>
        __dtf::__private::TestReturn::into_test_result(#ident())
    };
    // Spanned at the name, so that `line!()` is the line of the function rather than the attribute.
    let location = quote_spanned! {ident.span()=>
        file: __dtf::__private::core::file!(),
        line: __dtf::__private::core::line!(),
    };
    let some = quote!(__dtf::__private::core::option::Option::Some);

    let mut fields = Vec::new();
    if let Some(reason) = &markers.ignore {
        fields.push(quote!(ignore: true));
        if let Some(reason) = reason {
            fields.push(quote!(ignore_reason: #some(#reason)));
        }
    }
    match &markers.should_panic {
        Some(None) => fields.push(quote!(should_panic: __dtf::__private::ShouldPanic::Yes)),
        Some(Some(text)) => fields.push(quote!(
            should_panic: __dtf::__private::ShouldPanic::WithMessage(#text)
        )),
        None => {}
    }
    if let Some(nanos) = options.timeout_nanos {
        fields.push(quote!(
            timeout: #some(__dtf::__private::core::time::Duration::from_nanos(#nanos))
        ));
    }
    if let Some(env) = &options.env {
        let (names, values): (Vec<&String>, Vec<&String>) = env.iter().map(|(n, v)| (n, v)).unzip();
        fields.push(quote!(env: &[#((#names, #values)),*]));
    }
    if let Some(variant) = options.isolation {
        let variant = syn::Ident::new(variant, Span::call_site());
        fields.push(quote!(
            isolation: #some(__dtf::__private::Isolation::#variant)
        ));
    }
    if let Some(retries) = options.retries {
        fields.push(quote!(retries: #some(#retries)));
    }
    if let Some(bytes) = options.memory_bytes {
        fields.push(quote!(memory: #some(#bytes)));
    }
    if let Some(variant) = options.spawn {
        let variant = syn::Ident::new(variant, Span::call_site());
        fields.push(quote!(
            spawn: ::core::option::Option::Some(::dtf::__private::Spawn::#variant)
        ));
    }

    // A `#[test]` twin that exists only where libtest's harness runs (rustc strips `#[test]`
    // items from `harness = false` targets): a target that forgot `harness = false` fails
    // loudly with what to do, instead of silently running no dtf test at all.
    let twin = syn::Ident::new(&format!("__dtf_{name}_needs_harness_false"), ident.span());
    let twin_cfgs = function.attrs.iter().filter(|a| a.path().is_ident("cfg"));

    quote! {
        #(#twin_cfgs)*
        // The built-in attribute by its path through `core` (in the extern prelude of every
        // edition): `use dtf::test;` may shadow `test`.
        #[core::prelude::v1::test]
        #[doc(hidden)]
        fn #twin() {
            #import
            __dtf::__private::wrong_harness(#name)
        }

        #(#cfgs)*
        #[doc(hidden)]
        const _: () = {
            #import
            __dtf::__private::inventory::submit! {
                __dtf::__private::TestDef {
                    module_path: __dtf::__private::core::module_path!(),
                    name: #name,
                    func: || #result,
                    #location
                    #(#fields,)*
                    ..__dtf::__private::TestDef::DEFAULT
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use proc_macro2::TokenStream;
    use quote::quote;

    use super::{expand, fallback};

    fn expanded(args: TokenStream, item: TokenStream) -> String {
        match expand(args, item) {
            Ok(tokens) => tokens.to_string(),
            Err(error) => panic!("unexpected error: {error}"),
        }
    }

    fn error(item: TokenStream) -> String {
        match expand(TokenStream::new(), item) {
            Ok(tokens) => panic!("expected an error, got {tokens}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn registers_the_function_and_keeps_it() {
        let code = expanded(
            quote!(timeout = "2s", env(A = "1"), retries = 1),
            quote! {
                /// Docs.
                #[should_panic(expected = "boom")]
                #[ignore]
                pub fn r#boom() { panic!("boom") }
            },
        );
        let expected_parts = [
            "# [doc = r\" Docs.\"] pub fn r#boom ()",
            "const _ : () = { # [allow (unused_extern_crates , clippy :: useless_attribute)] extern crate dtf as __dtf ;",
            "__dtf :: __private :: inventory :: submit !",
            "name : \"boom\"",
            "func : || __dtf :: __private :: TestReturn :: into_test_result (r#boom ())",
            "ignore : true",
            "should_panic : __dtf :: __private :: ShouldPanic :: WithMessage (\"boom\")",
            "timeout : __dtf :: __private :: core :: option :: Option :: Some (__dtf :: __private :: core :: time :: Duration :: from_nanos (2000000000u64))",
            "env : & [(\"A\" , \"1\")]",
            "retries : __dtf :: __private :: core :: option :: Option :: Some (1u32)",
            ".. __dtf :: __private :: TestDef :: DEFAULT",
        ];
        for part in expected_parts {
            assert!(code.contains(part), "`{part}` missing from {code}");
        }
        assert!(!code.contains("# [ignore]") && !code.contains("# [should_panic"));
        assert!(!code.contains("ignore_reason") && !code.contains("memory"));
    }

    #[test]
    fn async_functions_become_blocking() {
        let code = expanded(
            TokenStream::new(),
            quote!(
                async fn waits() -> Result<(), String> {
                    Ok(())
                }
            ),
        );
        assert!(!code.contains("async fn"), "{code}");
        assert!(
            code.contains(
                "fn waits () -> Result < () , String > { # [allow (unused_extern_crates , clippy :: useless_attribute)] extern crate dtf as __dtf ; __dtf :: __private :: block_on_runtime (__dtf :: __private :: Runtime { multi_thread : false , worker_threads : __dtf :: __private :: core :: option :: Option :: None , start_paused : false , } , async move { Ok (()) }) }"
            ),
            "{code}"
        );
    }

    #[test]
    fn cfg_applies_to_the_registration_and_the_libtest_twin() {
        let code = expanded(
            TokenStream::new(),
            quote!(
                #[cfg(unix)]
                fn only_unix() {}
            ),
        );
        // On the function, on its `#[test]` twin and on its registration.
        assert_eq!(code.matches("# [cfg (unix)]").count(), 3, "{code}");
    }

    #[test]
    fn a_libtest_twin_explains_a_missing_harness_false() {
        let code = expanded(
            TokenStream::new(),
            quote!(
                fn plain() {}
            ),
        );
        assert!(
            code.contains(
                "# [core :: prelude :: v1 :: test] # [doc (hidden)] fn __dtf_plain_needs_harness_false () { # [allow (unused_extern_crates , clippy :: useless_attribute)] extern crate dtf as __dtf ; __dtf :: __private :: wrong_harness (\"plain\") }"
            ),
            "{code}"
        );
    }

    #[test]
    fn runtime_options_build_the_runtime_of_an_async_test() {
        let code = expanded(
            quote!(flavor = "multi_thread", worker_threads = 3),
            quote!(
                async fn many() {}
            ),
        );
        assert!(
            code.contains("Runtime { multi_thread : true , worker_threads : __dtf :: __private :: core :: option :: Option :: Some (3usize) , start_paused : false , }"),
            "{code}"
        );
        let code = expanded(
            quote!(start_paused = true),
            quote!(
                async fn paused() {}
            ),
        );
        assert!(code.contains("start_paused : true"), "{code}");
        let message = |args: TokenStream, item: TokenStream| match expand(args, item) {
            Ok(tokens) => panic!("expected an error, got {tokens}"),
            Err(error) => error.to_string(),
        };
        assert_eq!(
            message(
                quote!(flavor = "multi_thread"),
                quote!(
                    fn sync() {}
                )
            ),
            "`flavor` configures the tokio runtime of an `async fn` test, but this test is not `async`"
        );
        assert_eq!(
            message(
                quote!(worker_threads = 2),
                quote!(
                    async fn a() {}
                )
            ),
            r#"`worker_threads` needs the multi-thread runtime: add `flavor = "multi_thread"`"#
        );
        assert_eq!(
            message(
                quote!(flavor = "multi_thread", start_paused = true),
                quote!(
                    async fn a() {}
                )
            ),
            r#"`start_paused = true` needs the current-thread runtime: remove `flavor = "multi_thread"`"#
        );
    }

    #[test]
    fn rejects_what_cannot_be_a_test() {
        let not_fn = "`#[dtf::test]` can only be applied to a function";
        assert_eq!(
            error(quote!(
                struct S;
            )),
            not_fn
        );
        assert_eq!(
            error(quote!(
                pub mod m {}
            )),
            not_fn
        );
        assert_eq!(
            error(quote!(
                fn f(n: u32) {}
            )),
            "`#[dtf::test]` functions cannot take parameters"
        );
        assert_eq!(
            error(quote!(
                fn f<T>() {}
            )),
            "`#[dtf::test]` functions cannot be generic"
        );
        assert_eq!(
            error(quote!(
                unsafe fn f() {}
            )),
            "`#[dtf::test]` functions cannot be `unsafe`"
        );
        assert_eq!(
            error(quote!(
                fn f(&self) {}
            )),
            "`#[dtf::test]` cannot be applied to methods: a test must be a free function"
        );
    }

    #[test]
    fn errors_keep_the_function_without_test_attributes() {
        let kept = fallback(quote!(
            #[ignore]
            #[allow(unused)]
            fn f(n: u32) {}
        ));
        assert_eq!(kept.to_string(), "# [allow (unused)] fn f (n : u32) { }");
        assert_eq!(
            fallback(quote!(
                struct S;
            ))
            .to_string(),
            "struct S ;"
        );
    }
}
