//! Byte-level BPE training: count unique chunks in parallel, then merge with incremental
//! pair-count updates driven by a max-heap with lazy invalidation.
//!
//! The result is a pure function of the multiset of chunk counts: each merge takes the pair with
//! the highest count, ties going to the smaller `(left, right)` ids (rustbpe's rule, so the two can
//! be compared merge for merge), and merging is left to right without overlap. Thread count and the
//! order documents arrive in change nothing.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use hashbrown::HashMap;
use rayon::prelude::*;

use crate::split::Splitter;

/// Pairs are packed as `left << 32 | right`, so integer order is `(left, right)` order.
type Pair = u64;

#[inline(always)]
fn pack(a: u32, b: u32) -> Pair {
    ((a as u64) << 32) | b as u64
}

#[inline(always)]
fn unpack(p: Pair) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

/// Counts of unique chunks, accumulated batch by batch so the corpus never sits in memory whole.
pub struct ChunkCounter {
    splitter: Splitter,
    counts: HashMap<Box<[u8]>, i64>,
    pool: Option<rayon::ThreadPool>,
    texts: u64,
    bytes: u64,
}

impl ChunkCounter {
    /// `num_threads`: `None` uses rayon's global pool (one thread per core).
    pub fn new(pattern: &str, num_threads: Option<usize>) -> Result<Self, String> {
        let splitter = Splitter::new(pattern)?;
        let pool = match num_threads {
            None => None,
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.max(1))
                    .build()
                    .map_err(|e| format!("cannot start {n} threads: {e}"))?,
            ),
        };
        Ok(Self {
            splitter,
            counts: HashMap::new(),
            pool,
            texts: 0,
            bytes: 0,
        })
    }

    pub fn splitter(&self) -> &Splitter {
        &self.splitter
    }

    /// Texts and UTF-8 bytes counted so far, and the unique chunks among them.
    pub fn stats(&self) -> (u64, u64, usize) {
        (self.texts, self.bytes, self.counts.len())
    }

    /// Split and count a batch of texts in parallel, then fold the batch into the totals.
    pub fn add<S: AsRef<str> + Sync>(&mut self, texts: &[S]) -> Result<(), String> {
        let splitter = &self.splitter;
        let count_batch = || {
            texts
                .par_iter()
                .with_min_len(16)
                .try_fold(HashMap::<&[u8], i64>::new, |mut local, text| {
                    splitter.for_each(text.as_ref(), |chunk| {
                        *local.entry(chunk.as_bytes()).or_insert(0) += 1;
                    })?;
                    Ok::<_, String>(local)
                })
                .try_reduce(HashMap::new, |a, b| {
                    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                    for (k, v) in small {
                        *big.entry(k).or_insert(0) += v;
                    }
                    Ok(big)
                })
        };
        let batch = match &self.pool {
            Some(pool) => pool.install(count_batch)?,
            None => count_batch()?,
        };
        for (chunk, n) in batch {
            *self.counts.entry_ref(chunk).or_insert(0) += n;
        }
        self.texts += texts.len() as u64;
        self.bytes += texts.iter().map(|t| t.as_ref().len() as u64).sum::<u64>();
        Ok(())
    }

    /// Learn `vocab_size - 256` merges from everything counted so far.
    pub fn train(self, vocab_size: usize) -> Result<Bpe, String> {
        if vocab_size < 256 {
            return Err(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            ));
        }
        // Exact sizes up front: growing the flat id array by doubling would briefly hold up to
        // three times its size at the moment of peak memory.
        let words = self.counts.len();
        let bytes = self.counts.keys().map(|k| k.len()).sum();
        let merges = learn_merges(self.counts.into_iter(), (words, bytes), vocab_size - 256);
        Ok(Bpe::new(merges, self.splitter))
    }
}

/// Unique chunks as byte ids in one flat array; merging shrinks each word in place.
struct Words {
    ids: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

/// The merge loop. Returns the merges in order; merge `i` creates token `256 + i`.
/// `capacity`: (number of chunks, their total bytes), a hint for allocating the word arrays.
pub fn learn_merges(
    chunks: impl Iterator<Item = (Box<[u8]>, i64)>,
    capacity: (usize, usize),
    num_merges: usize,
) -> Vec<(u32, u32)> {
    let (n, total) = capacity;
    let mut words = Words {
        ids: Vec::with_capacity(total),
        start: Vec::with_capacity(n),
        len: Vec::with_capacity(n),
        count: Vec::with_capacity(n),
    };
    for (bytes, n) in chunks {
        // A one-byte chunk has no pair to merge: it can never matter.
        if bytes.len() < 2 || n <= 0 {
            continue;
        }
        words.start.push(words.ids.len());
        words.len.push(bytes.len() as u32);
        words.count.push(n);
        words.ids.extend(bytes.iter().map(|&b| b as u32));
    }

    release_free_memory();

    // Initial pair counts, and for each pair the words it occurs in (each word once).
    let mut pair_count: HashMap<Pair, i64> = HashMap::new();
    let mut where_: HashMap<Pair, Vec<u32>> = HashMap::new();
    for w in 0..words.start.len() {
        let (s, n, c) = (words.start[w], words.len[w] as usize, words.count[w]);
        for k in s..s + n - 1 {
            let p = pack(words.ids[k], words.ids[k + 1]);
            *pair_count.entry(p).or_insert(0) += c;
            let list = where_.entry(p).or_default();
            if list.last() != Some(&(w as u32)) {
                list.push(w as u32);
            }
        }
    }
    where_.values_mut().for_each(|list| list.shrink_to_fit());
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> =
        pair_count.iter().map(|(&p, &c)| (c, Reverse(p))).collect();

    let mut merges = Vec::with_capacity(num_merges);
    let mut new_where: HashMap<Pair, Vec<u32>> = HashMap::new();
    while merges.len() < num_merges {
        let Some((queued, Reverse(pair))) = heap.pop() else {
            break;
        };
        // Counts of existing pairs only fall, so a queued count is an upper bound: refresh and
        // requeue a stale entry; the first entry whose count is current is the true maximum.
        let current = pair_count.get(&pair).copied().unwrap_or(0);
        if current <= 0 {
            where_.remove(&pair);
            continue;
        }
        if current != queued {
            heap.push((current, Reverse(pair)));
            continue;
        }
        let (a, b) = unpack(pair);
        let z = 256 + merges.len() as u32;
        merges.push((a, b));
        pair_count.remove(&pair);

        // Every occurrence of `pair` is in a word listed for it: the pair came into existence
        // either at the start or in the merge that created its newer token, and was listed then.
        let listed = where_.remove(&pair).unwrap_or_default();
        for &w in &listed {
            let (s, n, c) = (
                words.start[w as usize],
                words.len[w as usize] as usize,
                words.count[w as usize],
            );
            let ids = &mut words.ids[s..s + n];
            let (mut r, mut wr) = (0usize, 0usize);
            let mut changed = false;
            while r < n {
                if r + 1 < n && ids[r] == a && ids[r + 1] == b {
                    changed = true;
                    if wr > 0 {
                        let x = ids[wr - 1];
                        remove_count(&mut pair_count, pack(x, a), c);
                        add_new(&mut pair_count, &mut new_where, pack(x, z), c, w);
                    }
                    if r + 2 < n {
                        let y = ids[r + 2];
                        remove_count(&mut pair_count, pack(b, y), c);
                        add_new(&mut pair_count, &mut new_where, pack(z, y), c, w);
                    }
                    ids[wr] = z;
                    wr += 1;
                    r += 2;
                } else {
                    ids[wr] = ids[r];
                    wr += 1;
                    r += 1;
                }
            }
            if changed {
                words.len[w as usize] = wr as u32;
            }
        }
        for (p, list) in new_where.drain() {
            let c = pair_count.get(&p).copied().unwrap_or(0);
            if c > 0 {
                heap.push((c, Reverse(p)));
                where_.insert(p, list.into_boxed_slice().into_vec());
            }
        }
    }
    merges
}

/// Hand memory freed so far back to the OS. The chunk map was filled on other threads, so glibc
/// keeps its freed keys in those threads' arenas, where the merge loop (this thread) cannot reuse
/// them: without this, the map's memory stays resident beside the merge structures, at the peak.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Subtract `c` occurrences of `p`; a pair that no longer occurs leaves the map (it never returns:
/// existing pairs only lose occurrences), which keeps the map to live pairs.
#[inline(always)]
fn remove_count(pair_count: &mut HashMap<Pair, i64>, p: Pair, c: i64) {
    if let Some(n) = pair_count.get_mut(&p) {
        *n -= c;
        if *n <= 0 {
            pair_count.remove(&p);
        }
    }
}

#[inline(always)]
fn add_new(
    pair_count: &mut HashMap<Pair, i64>,
    new_where: &mut HashMap<Pair, Vec<u32>>,
    p: Pair,
    c: i64,
    w: u32,
) {
    *pair_count.entry(p).or_insert(0) += c;
    let list = new_where.entry(p).or_default();
    if list.last() != Some(&w) {
        list.push(w);
    }
}

/// A trained byte-level BPE: the ordered merges plus the split pattern they were learned under.
pub struct Bpe {
    merges: Vec<(u32, u32)>,
    rank: HashMap<Pair, u32>,
    token_bytes: Vec<Vec<u8>>,
    splitter: Splitter,
}

impl Bpe {
    pub fn new(merges: Vec<(u32, u32)>, splitter: Splitter) -> Self {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut rank = HashMap::with_capacity(merges.len());
        for (i, &(a, b)) in merges.iter().enumerate() {
            let mut bytes = token_bytes[a as usize].clone();
            bytes.extend_from_slice(&token_bytes[b as usize]);
            token_bytes.push(bytes);
            rank.insert(pack(a, b), 256 + i as u32);
        }
        Self {
            merges,
            rank,
            token_bytes,
            splitter,
        }
    }

    pub fn merges(&self) -> &[(u32, u32)] {
        &self.merges
    }

    pub fn pattern(&self) -> &str {
        self.splitter.pattern()
    }

    /// 256 byte tokens plus one per merge.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// The bytes of every token id.
    pub fn token_bytes(&self) -> &[Vec<u8>] {
        &self.token_bytes
    }

    /// Encode as training saw it: split, then in each chunk apply the merges in the order they
    /// were learned, each left to right. (Inference uses tiktoken; this is the reference it is
    /// tested against.)
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        self.splitter.for_each(text, |chunk| {
            let mut ids: Vec<u32> = chunk.bytes().map(u32::from).collect();
            loop {
                // The earliest merge present among adjacent pairs is the next one training applied.
                let best = ids
                    .windows(2)
                    .filter_map(|w| self.rank.get(&pack(w[0], w[1])).copied())
                    .min();
                let Some(z) = best else { break };
                let (a, b) = self.merges[(z - 256) as usize];
                let mut merged = Vec::with_capacity(ids.len());
                let mut i = 0;
                while i < ids.len() {
                    if i + 1 < ids.len() && ids[i] == a && ids[i + 1] == b {
                        merged.push(z);
                        i += 2;
                    } else {
                        merged.push(ids[i]);
                        i += 1;
                    }
                }
                ids = merged;
            }
            out.extend_from_slice(&ids);
        })?;
        Ok(out)
    }

    /// Bytes of a sequence of ids (no UTF-8 decoding: tokens may split a code point).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for &id in ids {
            let bytes = self.token_bytes.get(id as usize).ok_or_else(|| {
                format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab_size()
                )
            })?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::GPT4_SPLIT_PATTERN;

    /// The slow reference: recount every pair from scratch before each merge.
    fn reference_merges(texts: &[&str], num_merges: usize) -> Vec<(u32, u32)> {
        let splitter = Splitter::regex_only(GPT4_SPLIT_PATTERN).unwrap();
        let mut counts: std::collections::BTreeMap<Vec<u32>, i64> = Default::default();
        for t in texts {
            for chunk in splitter.split(t).unwrap() {
                *counts
                    .entry(chunk.bytes().map(u32::from).collect())
                    .or_insert(0) += 1;
            }
        }
        let mut words: Vec<(Vec<u32>, i64)> = counts.into_iter().collect();
        let mut merges = Vec::new();
        for m in 0..num_merges {
            let mut pc: std::collections::BTreeMap<(u32, u32), i64> = Default::default();
            for (ids, c) in &words {
                for w in ids.windows(2) {
                    *pc.entry((w[0], w[1])).or_insert(0) += c;
                }
            }
            // highest count; among equals the smallest pair (BTreeMap iterates pairs ascending)
            let Some((&best, _)) = pc.iter().max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0))) else {
                break;
            };
            let z = 256 + m as u32;
            for (ids, _) in &mut words {
                let mut out = Vec::new();
                let mut i = 0;
                while i < ids.len() {
                    if i + 1 < ids.len() && (ids[i], ids[i + 1]) == best {
                        out.push(z);
                        i += 2;
                    } else {
                        out.push(ids[i]);
                        i += 1;
                    }
                }
                *ids = out;
            }
            merges.push(best);
        }
        merges
    }

    fn train(texts: &[&str], vocab_size: usize, threads: Option<usize>) -> Bpe {
        let mut counter = ChunkCounter::new(GPT4_SPLIT_PATTERN, threads).unwrap();
        for batch in texts.chunks(3) {
            counter.add(batch).unwrap();
        }
        counter.train(vocab_size).unwrap()
    }

    const TEXTS: &[&str] = &[
        "hello hello hello world, the world says hello",
        "aaaaaaa aaaa aa abababab bababa",
        "numbers 1234567 and 3.14159 and ٣٤٥ ½",
        "   whitespace\t\truns \n\n\n and\r\nnewlines   ",
        "",
        "naïve café 北京 😀😀😀 it's they'll we've you're I'D",
    ];

    #[test]
    fn matches_the_slow_reference() {
        let bpe = train(TEXTS, 256 + 120, None);
        assert_eq!(bpe.merges(), reference_merges(TEXTS, 120).as_slice());
    }

    #[test]
    fn same_merges_whatever_the_thread_count() {
        let one = train(TEXTS, 400, Some(1));
        let four = train(TEXTS, 400, Some(4));
        assert_eq!(one.merges(), four.merges());
    }

    #[test]
    fn stops_when_nothing_is_left_to_merge() {
        let bpe = train(&["abc"], 1000, None);
        assert_eq!(bpe.merges(), &[(97, 98), (256, 99)]);
        assert_eq!(bpe.token_bytes()[257], b"abc");
    }

    #[test]
    fn vocab_below_256_is_an_error() {
        let counter = ChunkCounter::new(GPT4_SPLIT_PATTERN, None).unwrap();
        assert!(counter.train(255).is_err());
    }

    #[test]
    fn encode_round_trips_and_uses_the_merges() {
        let bpe = train(TEXTS, 300, None);
        for t in TEXTS {
            let ids = bpe.encode(t).unwrap();
            assert_eq!(bpe.decode_bytes(&ids).unwrap(), t.as_bytes());
        }
        assert_eq!(bpe.encode("hello").unwrap().len(), 1);
    }
}
