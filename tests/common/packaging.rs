//! The library has two manifests: `dtf/` (the package path and git dependencies name, `dtf`)
//! and `dtf-harness/` (the package published to crates.io, whose sources are `dtf/src`). They
//! must build the same library: same dependencies, features and lints.

#[cfg(test)]
mod tests {
    use crate::workspace_root;

    fn manifest(dir: &str) -> toml::Table {
        let path = workspace_root().join(dir).join("Cargo.toml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        text.parse()
            .unwrap_or_else(|e| panic!("{path:?} is not valid TOML: {e}"))
    }

    #[test]
    fn the_published_package_builds_what_the_checkout_builds() {
        let dtf = manifest("dtf");
        let harness = manifest("dtf-harness");
        for key in [
            "dependencies",
            "features",
            "lints",
            "target",
            "build-dependencies",
        ] {
            assert_eq!(
                dtf.get(key),
                harness.get(key),
                "[{key}] differs between dtf/Cargo.toml and dtf-harness/Cargo.toml: the \
                 published package must build the same library; make the two tables equal"
            );
        }
        assert_eq!(dtf["package"]["name"].as_str(), Some("dtf"));
        assert_eq!(harness["package"]["name"].as_str(), Some("dtf-harness"));
        assert_eq!(harness["lib"]["name"].as_str(), Some("dtf"));
        let src = workspace_root().join("dtf-harness/src");
        assert_eq!(
            std::fs::canonicalize(&src).unwrap(),
            std::fs::canonicalize(workspace_root().join("dtf/src")).unwrap(),
            "dtf-harness/src is a link to dtf/src"
        );
    }
}
