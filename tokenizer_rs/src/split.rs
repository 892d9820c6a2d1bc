//! Pre-splitting text into chunks ("words") before BPE: a regex decides where merges may not cross.
//!
//! Any pattern runs through `fancy_regex` (the engine rustbpe and tiktoken use, so chunk boundaries
//! agree with theirs). The GPT-4-style family of patterns, which is what every nanochat run uses,
//! also has a hand-written matcher: on ~100 MB of English it is an order of magnitude faster than the
//! backtracking engine, which was most of rustbpe's training time (12 of 13 s here). The fast path is
//! chosen only when the pattern string is exactly one we implement, and it classifies characters
//! with the very Unicode tables `fancy_regex` compiles `\p{L}`, `\p{N}` and `\s` from (regex-syntax),
//! so both paths split identically; tests compare them on every code point and on random text.

use std::sync::OnceLock;

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};

/// nanochat's split pattern: GPT-4's, with numbers chunked by at most two digits instead of three.
pub const GPT4_SPLIT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;

/// How a text is cut into chunks.
#[derive(Clone, Debug)]
pub struct Splitter {
    pattern: String,
    regex: Regex,
    /// `Some(max_digits)` when `pattern` is the GPT-4 family with `\p{N}{1,max_digits}`.
    fast: Option<usize>,
}

impl Splitter {
    /// Compile `pattern`; an invalid regex is an error message, not a panic.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let regex = Regex::new(pattern).map_err(|e| format!("invalid split pattern: {e}"))?;
        Ok(Self {
            pattern: pattern.to_string(),
            regex,
            fast: gpt4_family_digits(pattern),
        })
    }

    /// The same splitter with the fast matcher turned off (the reference in tests and benchmarks).
    pub fn regex_only(pattern: &str) -> Result<Self, String> {
        Ok(Self {
            fast: None,
            ..Self::new(pattern)?
        })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the hand-written matcher is in use.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// Call `f` with every chunk of `text`, in order. The chunks partition the text for the
    /// GPT-4 family; for other patterns, text the regex does not match is skipped, as in rustbpe.
    pub fn for_each<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self.fast {
            Some(max_digits) => {
                let table = class_table();
                let bytes = text.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    let end = gpt4_chunk_end(bytes, i, max_digits, table);
                    f(&text[i..end]);
                    i = end;
                }
            }
            None => {
                for m in self.regex.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed on the text: {e}"))?;
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
            }
        }
        Ok(())
    }

    /// The chunks of `text` as a vector (tests, encoding).
    pub fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, String> {
        let mut out = Vec::new();
        self.for_each(text, |c| out.push(c))?;
        Ok(out)
    }
}

/// `Some(n)` if `pattern` is GPT-4's split pattern with `\p{N}{1,n}` (n = 1..=9), else `None`.
fn gpt4_family_digits(pattern: &str) -> Option<usize> {
    let (head, tail) = GPT4_SPLIT_PATTERN.split_once(r"\p{N}{1,2}")?;
    let rest = pattern.strip_prefix(head)?.strip_prefix(r"\p{N}{1,")?;
    let (digits, rest) = rest.split_once('}')?;
    let n: usize = digits.parse().ok()?;
    (rest == tail && (1..=9).contains(&n) && digits.len() == 1).then_some(n)
}

/// Letter / number / whitespace flags of every code point, from regex-syntax's Unicode tables
/// (the ones `fancy_regex` uses), built once: 1.1 MB, a few milliseconds.
fn class_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = vec![0u8; 0x11_0000];
        for (class, flag) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in unicode_ranges(class) {
                for cp in lo..=hi {
                    table[cp as usize] |= flag;
                }
            }
        }
        table
    })
}

fn unicode_ranges(class: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(true)
        .build()
        .parse(class)
        .expect("built-in Unicode class parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => unreachable!("{class} parsed to {other:?}"),
    }
}

/// The code point starting at byte `i` of valid UTF-8, and its length in bytes.
#[inline(always)]
fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        let cp = ((b0 & 0x07) << 18)
            | ((s[i + 1] as u32 & 0x3F) << 12)
            | ((s[i + 2] as u32 & 0x3F) << 6)
            | (s[i + 3] as u32 & 0x3F);
        (cp, 4)
    }
}

const CR: u32 = '\r' as u32;
const LF: u32 = '\n' as u32;

/// End (exclusive) of the run of code points with `flag` set starting at `i`.
#[inline(always)]
fn run_end(s: &[u8], mut i: usize, flag: u8, table: &[u8]) -> usize {
    while i < s.len() {
        let (c, len) = decode(s, i);
        if table[c as usize] & flag == 0 {
            break;
        }
        i += len;
    }
    i
}

/// End of a run of "other" code points (not letter, number or whitespace) from `i`.
#[inline(always)]
fn other_run_end(s: &[u8], mut i: usize, table: &[u8]) -> usize {
    while i < s.len() {
        let (c, len) = decode(s, i);
        if table[c as usize] & (LETTER | NUMBER | SPACE) != 0 {
            break;
        }
        i += len;
    }
    i
}

/// End of a run of `\r` / `\n` from `i` (both are one byte).
#[inline(always)]
fn newline_run_end(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && (s[i] == b'\r' || s[i] == b'\n') {
        i += 1;
    }
    i
}

/// `c` lower-cased if it is an ASCII letter.
#[inline(always)]
fn ascii_lower(c: u32) -> u32 {
    if (b'A' as u32..=b'Z' as u32).contains(&c) {
        c + 32
    } else {
        c
    }
}

/// End of the chunk that the GPT-4-family pattern matches at byte `i` (< s.len()).
///
/// The alternatives in pattern order; the first that matches at `i` wins (leftmost-first), and
/// within it greedy quantifiers take all they can, since nothing follows the alternation.
fn gpt4_chunk_end(s: &[u8], i: usize, max_digits: usize, table: &[u8]) -> usize {
    let n = s.len();
    let (c0, l0) = decode(s, i);
    let k0 = table[c0 as usize];
    let next = i + l0;

    // 1. '(?i:[sdmt]|ll|ve|re): under Unicode case folding `s` also matches U+017F (long s).
    if c0 == '\'' as u32 && next < n {
        let (c1, l1) = decode(s, next);
        let after = next + l1;
        if matches!(ascii_lower(c1), 0x73 | 0x64 | 0x6D | 0x74) || c1 == 0x17F {
            return after; // s d m t
        }
        if after < n {
            let (c2, l2) = decode(s, after);
            match (ascii_lower(c1), ascii_lower(c2)) {
                (0x6C, 0x6C) | (0x76, 0x65) | (0x72, 0x65) => return after + l2, // ll ve re
                _ => {}
            }
        }
    }

    // 2. [^\r\n\p{L}\p{N}]?+\p{L}+ : a letter run, optionally led by one non-newline
    //    non-number code point (possessive: if it is taken, letters must follow).
    if k0 & LETTER != 0 {
        return run_end(s, next, LETTER, table);
    }
    if c0 != CR && c0 != LF && k0 & NUMBER == 0 && next < n {
        let (c1, l1) = decode(s, next);
        if table[c1 as usize] & LETTER != 0 {
            return run_end(s, next + l1, LETTER, table);
        }
    }

    // 3. \p{N}{1,max_digits}
    if k0 & NUMBER != 0 {
        let mut end = next;
        for _ in 1..max_digits {
            if end >= n {
                break;
            }
            let (c, len) = decode(s, end);
            if table[c as usize] & NUMBER == 0 {
                break;
            }
            end += len;
        }
        return end;
    }

    // 4. " ?[^\s\p{L}\p{N}]++[\r\n]*" : punctuation and symbols, optionally led by one space.
    if c0 == ' ' as u32 && next < n {
        let (c1, l1) = decode(s, next);
        if table[c1 as usize] & (LETTER | NUMBER | SPACE) == 0 {
            return newline_run_end(s, other_run_end(s, next + l1, table));
        }
    }
    if k0 & SPACE == 0 {
        return newline_run_end(s, other_run_end(s, next, table));
    }

    // 5-7. Whitespace. \s*[\r\n] ends after the last newline of the run; otherwise \s+(?!\S)
    //      takes the run but leaves its last code point to lead the next chunk (" word"),
    //      unless the text ends; \s+ takes a lone whitespace code point.
    let mut end = i;
    let mut last_start = i;
    let mut after_newline = None;
    while end < n {
        let (c, len) = decode(s, end);
        if table[c as usize] & SPACE == 0 {
            break;
        }
        if c == CR || c == LF {
            after_newline = Some(end + len);
        }
        last_start = end;
        end += len;
    }
    if let Some(e) = after_newline {
        e
    } else if end == n || last_start == i {
        end
    } else {
        last_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_the_gpt4_family() {
        assert_eq!(gpt4_family_digits(GPT4_SPLIT_PATTERN), Some(2));
        let three = GPT4_SPLIT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}");
        assert_eq!(gpt4_family_digits(&three), Some(3));
        assert_eq!(gpt4_family_digits(r"\w+|\s+"), None);
        assert_eq!(gpt4_family_digits(&format!("{GPT4_SPLIT_PATTERN}|x")), None);
        assert!(!Splitter::new(r"\w+").unwrap().is_fast());
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        assert!(Splitter::new("(unclosed").is_err());
    }

    #[test]
    fn splits_like_gpt4() {
        let s = Splitter::new(GPT4_SPLIT_PATTERN).unwrap();
        let got = s.split("Hello world! It's 2025... \n\n  ok").unwrap();
        assert_eq!(
            got,
            vec!["Hello", " world", "!", " It", "'s", " ", "20", "25", "...", " \n\n", " ", " ok"]
        );
    }

    /// Every code point, alone and in the contexts that decide each alternative, splits the
    /// same way through the fast matcher and through fancy_regex.
    #[test]
    fn every_code_point_matches_the_regex() {
        let fast = Splitter::new(GPT4_SPLIT_PATTERN).unwrap();
        let slow = Splitter::regex_only(GPT4_SPLIT_PATTERN).unwrap();
        let mut text = String::new();
        // Planes 3-13 are unassigned apart from a few CJK extensions: sample them sparsely.
        let code_points = (0..0x3_0000u32)
            .chain((0x3_0000..0xE_0000).step_by(61))
            .chain(0xE_0000..0x11_0000);
        for cp in code_points {
            let Some(c) = char::from_u32(cp) else {
                continue;
            };
            for ctx in ["'{}a{} ", " {}!\n{}{} x", "1{}2\n{}a"] {
                text.push_str(&ctx.replace("{}", &c.to_string()));
            }
            if text.len() > 1 << 16 {
                assert_eq!(fast.split(&text).unwrap(), slow.split(&text).unwrap());
                text.clear();
            }
        }
        assert_eq!(fast.split(&text).unwrap(), slow.split(&text).unwrap());
    }

    /// Random strings over an alphabet that exercises every alternative.
    #[test]
    fn random_text_matches_the_regex() {
        let alphabet: Vec<char> = "aZé' \t\n\r\u{a0}\u{3000}1٣½.!-(ſSlLvVeErRdDmMtT语\u{301}😀_"
            .chars()
            .collect();
        let mut state = 0x2545F4914F6CDD1Du64;
        for digits in [1usize, 2, 3] {
            let pattern =
                GPT4_SPLIT_PATTERN.replace(r"\p{N}{1,2}", &format!(r"\p{{N}}{{1,{digits}}}"));
            let fast = Splitter::new(&pattern).unwrap();
            assert!(fast.is_fast());
            let slow = Splitter::regex_only(&pattern).unwrap();
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as usize
            };
            for _ in 0..5000 {
                let len = next() % 24;
                let text: String = (0..len)
                    .map(|_| alphabet[next() % alphabet.len()])
                    .collect();
                assert_eq!(
                    fast.split(&text).unwrap(),
                    slow.split(&text).unwrap(),
                    "text {text:?}"
                );
            }
        }
    }
}
