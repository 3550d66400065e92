//! A byte-level BPE tokenizer (GPT-2's scheme) built from a GGUF file's own vocabulary
//! (`tokenizer.ggml.tokens`) and merges (`tokenizer.ggml.merges`), so that the evaluation
//! feeds a model exactly the token ids it was trained on.
//!
//! Encoding a text:
//! 1. pre-tokenization: for `tokenizer.ggml.pre = "smollm"` every numeric character becomes
//!    a piece of its own (Hugging Face's `Digits(individual_digits=true)`), then the rest is
//!    split by GPT-2's regex `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!    (`ByteLevel(add_prefix_space=false, use_regex=true)`); `"gpt2"` skips the digit split;
//! 2. each piece's UTF-8 bytes become GPT-2's printable stand-in characters (bytes to unicode);
//! 3. BPE: the adjacent pair of lowest merge rank is merged, leftmost first, until no pair of
//!    the piece has a merge.
//!
//! A byte without a token in the vocabulary is dropped, as Hugging Face's BPE does without an
//! unknown token (SmolLM2 has none for 21 bytes: a few control characters, and bytes that
//! valid UTF-8 never holds or holds only for code points beyond U+3FFFF): such a text does not
//! survive `decode(encode(text))`.
//!
//! Special and control tokens (`token_type` 3, like `<|im_start|>`) are not recognized in the
//! text: the text is encoded as plain text, and a caller that needs a special token adds its
//! id itself. [`Tokenizer::decode`] writes such tokens back as their text.
//!
//! The regex is `fancy-regex` (pure Rust, maintained, on top of the `regex` crate): the GPT-2
//! pattern needs the lookahead `(?!\S)` that the `regex` crate lacks. Hugging Face's
//! `tokenizers` crate was not used: by default it pulls in C code (onig) and download
//! features, and only its BPE and two pre-tokenizers are needed; the test vector
//! (`tests/data/tokenizer-smollm2.json`) checks this implementation against it.

use crate::gguf::{ErrorKind, Gguf, GgufError};
use fancy_regex::Regex;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// GPT-2's pre-tokenizer pattern.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// No symbol (the end of the list).
const NONE: usize = usize::MAX;

/// A byte-level BPE tokenizer; see the [module documentation](self).
///
/// ```no_run
/// use rotq_model::{gguf::Gguf, tokenizer::Tokenizer};
/// let g = Gguf::open("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
/// let tok = Tokenizer::from_gguf(&g)?;
/// let ids = tok.encode("Hello, world!");
/// assert_eq!(tok.decode(&ids), "Hello, world!");
/// # Ok::<(), rotq_model::gguf::GgufError>(())
/// ```
#[derive(Debug)]
pub struct Tokenizer {
    tokens: Vec<String>,
    /// `(left, right)` → `(rank, merged)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// The token of each single byte (`None` where the vocabulary has none).
    byte_ids: [Option<u32>; 256],
    /// The byte each stand-in character (`char as usize` below 324) represents.
    char_bytes: Vec<Option<u8>>,
    split: Regex,
    split_digits: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
}

/// GPT-2's bytes-to-unicode table: printable bytes stand for themselves, the others (control
/// characters, space, …) for the characters from U+0100 on, in byte order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, ch) in (0u32..).zip(table.iter_mut()) {
        let printable = matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        *ch = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    table
}

impl Tokenizer {
    /// Builds the tokenizer of a GGUF file: `tokenizer.ggml.model` must be `gpt2` and
    /// `tokenizer.ggml.pre` `smollm` or `gpt2` (else [`ErrorKind::UnsupportedTokenizer`]);
    /// a vocabulary or merge list that cannot work is an [`ErrorKind::Tokenizer`]. A token
    /// listed twice keeps its first id.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, GgufError> {
        let err = |what: String| GgufError::new(g.path(), ErrorKind::Tokenizer(what));
        let model = g.str("tokenizer.ggml.model")?;
        let pre = match g.get("tokenizer.ggml.pre") {
            Some(_) => g.str("tokenizer.ggml.pre")?,
            None => "",
        };
        let split_digits = match (model, pre) {
            ("gpt2", "smollm") => true,
            ("gpt2", "gpt2") => false,
            _ => {
                let (model, pre) = (model.to_string(), pre.to_string());
                let kind = ErrorKind::UnsupportedTokenizer { model, pre };
                return Err(GgufError::new(g.path(), kind));
            }
        };
        let tokens = g.str_array("tokenizer.ggml.tokens")?;
        if u32::try_from(tokens.len()).is_err() {
            return Err(err(format!("{} tokens do not fit u32 ids", tokens.len())));
        }
        let mut ids = HashMap::with_capacity(tokens.len());
        for (id, t) in (0u32..).zip(&tokens) {
            ids.entry(*t).or_insert(id);
        }
        let chars = byte_chars();
        let mut byte_ids = [None; 256];
        let mut char_bytes = vec![None; 324];
        for (b, (&ch, id)) in (0u8..=255).zip(chars.iter().zip(&mut byte_ids)) {
            char_bytes[ch as usize] = Some(b);
            *id = ids.get(ch.to_string().as_str()).copied();
        }
        if byte_ids.iter().flatten().count() < 128 {
            return Err(err(
                "not a byte-level vocabulary (most byte tokens missing)".into(),
            ));
        }
        let mut merges = HashMap::new();
        for (rank, m) in (0u32..).zip(g.str_array("tokenizer.ggml.merges")?) {
            let bad = |why: &str| err(format!("merge {} ({m:?}): {why}", rank + 1));
            let (a, b) = m.split_once(' ').ok_or_else(|| bad("not two tokens"))?;
            let id = |t: &str| {
                ids.get(t)
                    .copied()
                    .ok_or_else(|| bad("token not in vocabulary"))
            };
            let merged = id(&format!("{a}{b}"))?;
            merges.entry((id(a)?, id(b)?)).or_insert((rank, merged));
        }
        let special = |key: &str| -> Result<Option<u32>, GgufError> {
            match g.get(key) {
                None => Ok(None),
                Some(_) => match g.u32(key)? {
                    id if (id as usize) < tokens.len() => Ok(Some(id)),
                    id => Err(err(format!("{key} {id} is not a token id"))),
                },
            }
        };
        let add_bos = match g.get("tokenizer.ggml.add_bos_token") {
            None => false,
            Some(_) => g.bool("tokenizer.ggml.add_bos_token")?,
        };
        Ok(Tokenizer {
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            merges,
            byte_ids,
            char_bytes,
            split: Regex::new(GPT2_SPLIT).map_err(|e| err(format!("split regex: {e}")))?,
            split_digits,
            bos: special("tokenizer.ggml.bos_token_id")?,
            eos: special("tokenizer.ggml.eos_token_id")?,
            add_bos,
        })
    }

    /// The token ids of `text`, without a BOS token (see [`Tokenizer::add_bos`]); special
    /// tokens written in the text are encoded as plain text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let digit = match self.split_digits {
                true => rest.char_indices().find(|(_, c)| c.is_numeric()),
                false => None,
            };
            let (plain, digit) = match digit {
                Some((at, c)) => (&rest[..at], Some(&rest[at..at + c.len_utf8()])),
                None => (rest, None),
            };
            self.encode_plain(plain, &mut ids);
            rest = &rest[plain.len()..];
            if let Some(d) = digit {
                self.bpe(d, &mut ids);
                rest = &rest[d.len()..];
            }
        }
        ids
    }

    /// Splits a digit-free text with the GPT-2 regex and encodes each piece.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        let mut end = 0;
        for m in self.split.find_iter(text) {
            let Ok(m) = m else {
                break; // the backtracking limit: the rest becomes one piece, below
            };
            if m.start() > end {
                self.bpe(&text[end..m.start()], ids);
            }
            self.bpe(m.as_str(), ids);
            end = m.end();
        }
        if end < text.len() {
            self.bpe(&text[end..], ids);
        }
    }

    /// Byte-level BPE of one piece: the pair of lowest rank (leftmost of equals) is merged
    /// until none is left, with a heap of candidate merges over a linked list of symbols.
    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        let bytes = piece.bytes().filter_map(|b| self.byte_ids[b as usize]);
        let mut sym: Vec<u32> = bytes.collect();
        let n = sym.len();
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.checked_sub(1).unwrap_or(NONE)).collect();
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, sym: &[u32], left: usize, right: usize| {
            if let Some(&(rank, _)) = self.merges.get(&(sym[left], sym[right])) {
                heap.push(Reverse((rank, left)));
            }
        };
        for i in 1..n {
            push(&mut heap, &sym, i - 1, i);
        }
        while let Some(Reverse((rank, left))) = heap.pop() {
            let right = next[left];
            // Stale entries: the symbol was merged away, or its pair changed since.
            if sym[left] == u32::MAX || right == NONE {
                continue;
            }
            let Some(&(r, merged)) = self.merges.get(&(sym[left], sym[right])) else {
                continue;
            };
            if r != rank {
                continue;
            }
            sym[left] = merged;
            sym[right] = u32::MAX;
            next[left] = next[right];
            if next[left] != NONE {
                prev[next[left]] = left;
                push(&mut heap, &sym, left, next[left]);
            }
            if prev[left] != NONE {
                push(&mut heap, &sym, prev[left], left);
            }
        }
        out.extend(sym.into_iter().filter(|&s| s != u32::MAX));
    }

    /// The text of token ids, invalid UTF-8 (a character cut between ids) replaced by U+FFFD,
    /// as is an id outside the vocabulary. Special tokens come out as their text.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(token) = self.tokens.get(id as usize) else {
                bytes.extend("\u{fffd}".as_bytes());
                continue;
            };
            for ch in token.chars() {
                match self.char_bytes.get(ch as usize).copied().flatten() {
                    Some(b) => bytes.push(b),
                    None => bytes.extend(ch.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The beginning-of-sequence token (`tokenizer.ggml.bos_token_id`), if the file names one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token (`tokenizer.ggml.eos_token_id`), if the file names one: where
    /// generation stops.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether a prompt should start with [`Tokenizer::bos`] (`tokenizer.ggml.add_bos_token`,
    /// false when absent): [`Tokenizer::encode`] never adds it.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The number of tokens (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The text of token `id` as the vocabulary stores it (byte-level stand-in characters).
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
}
