//! Text edits at the places `syn` spans point to: everything else in a file (formatting,
//! comments) stays byte for byte.

use proc_macro2::{LineColumn, Span};

/// One replacement of `start..end` (byte offsets) with `text`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edit {
    /// First byte replaced.
    pub start: usize,
    /// One past the last byte replaced (`start` for an insertion).
    pub end: usize,
    /// What goes there.
    pub text: String,
}

/// Byte offsets of a file's line starts, to turn `syn`'s line/column positions into offsets.
pub struct Lines<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    /// Indexes `text`.
    pub fn new(text: &'a str) -> Lines<'a> {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Lines { text, starts }
    }

    /// The byte offset of a position (line 1-based, column in characters).
    pub fn offset(&self, at: LineColumn) -> usize {
        let Some(&start) = self.starts.get(at.line.saturating_sub(1)) else {
            return self.text.len();
        };
        let line = &self.text[start..];
        let column = line
            .char_indices()
            .nth(at.column)
            .map_or(line.len(), |(i, _)| i);
        start + column
    }

    /// `start..end` of a span.
    pub fn range(&self, span: Span) -> (usize, usize) {
        (self.offset(span.start()), self.offset(span.end()))
    }

    /// The whitespace that starts the line holding `offset`.
    pub fn indent_at(&self, offset: usize) -> &'a str {
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line = &self.text[line_start..];
        let width = line.len() - line.trim_start_matches([' ', '\t']).len();
        &line[..width]
    }
}

/// Applies non-overlapping edits; edits at the same offset keep their order.
pub fn apply(text: &str, edits: &[Edit]) -> String {
    let mut sorted: Vec<(usize, &Edit)> = edits.iter().enumerate().collect();
    sorted.sort_by_key(|(i, e)| (e.start, *i));
    let mut out = String::with_capacity(text.len() + 256);
    let mut at = 0;
    for (_, edit) in sorted {
        if edit.start < at {
            continue; // overlapping: the first one wins
        }
        out.push_str(&text[at..edit.start]);
        out.push_str(&edit.text);
        at = edit.end;
    }
    out.push_str(&text[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_become_offsets_and_edits_keep_the_rest() {
        let text = "// a comment\nfn  x() {}\n    #[test]  // kept\nfn é() {}\n";
        let file = syn::parse_file(text).unwrap();
        let lines = Lines::new(text);
        let syn::Item::Fn(f) = &file.items[1] else {
            panic!()
        };
        let (start, end) = lines.range(syn::spanned::Spanned::span(&f.attrs[0]));
        assert_eq!(&text[start..end], "#[test]");
        assert_eq!(lines.indent_at(start), "    ");
        let (s, e) = lines.range(f.sig.ident.span());
        assert_eq!(&text[s..e], "é");
        let out = apply(
            text,
            &[Edit {
                start,
                end,
                text: "#[dtf::test]".to_owned(),
            }],
        );
        assert_eq!(
            out,
            "// a comment\nfn  x() {}\n    #[dtf::test]  // kept\nfn é() {}\n"
        );
    }
}
