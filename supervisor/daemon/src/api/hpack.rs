//! HPACK decoding (RFC 7541) of a client's header blocks, for
//! [`super::authority`]: in time linear in the block, whatever a client
//! sends. A Huffman-coded string is decoded a symbol at a time from the
//! code's lengths (the code is canonical: its lengths give it), with no
//! set-up per string and no lookup per bit; the dynamic table holds at
//! most the size the daemon allows (entries, as RFC 7541 counts them).
//!
//! Must never: take more time or memory than a constant per byte of the
//! block (and the table's bound), or accept what RFC 7541 calls a decoding
//! error (an index past the table, a string past the block, an integer
//! past 2^28, Huffman padding longer than 7 bits or not of ones, the EOS
//! symbol, a table size update past the allowed size or after a field).

use std::collections::VecDeque;
use std::sync::LazyLock;

/// Why a header block could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the block ends inside a field")]
    Truncated,
    #[error("an integer past 2^28")]
    Integer,
    #[error("index {0} is not in the tables")]
    Index(usize),
    #[error("a Huffman-coded string that is not one: {0}")]
    Huffman(&'static str),
    #[error("a table size of {0} bytes, past the allowed size")]
    TableSize(usize),
    #[error("a table size update after a header field")]
    LateSizeUpdate,
    #[error("fields of more than {0} bytes in one block")]
    TooLarge(usize),
}

/// A decoder with the dynamic table of one connection's blocks.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    /// The table's size as RFC 7541 counts it (each entry's name and
    /// value lengths plus 32).
    size: usize,
    /// Its maximum now (set by the client's size updates).
    max: usize,
    /// The most the client may set it to.
    allowed: usize,
}

impl Decoder {
    /// A decoder whose client may use a table of `allowed` bytes (and
    /// starts with that size: RFC 7541's initial size is the setting's).
    pub fn new(allowed: usize) -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max: allowed,
            allowed,
        }
    }

    /// Decodes one whole header block, calling `field` with each field's
    /// name and value in order; past `limit` bytes of names and values in
    /// all (a small block can name a large table entry many times), it
    /// stops with [`DecodeError::TooLarge`].
    pub fn decode(
        &mut self,
        mut block: &[u8],
        limit: usize,
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        let mut fields = 0usize;
        let mut total = 0usize;
        let mut field = |name: &[u8], value: &[u8]| {
            total += name.len() + value.len();
            if total > limit {
                return Err(DecodeError::TooLarge(limit));
            }
            field(name, value);
            Ok(())
        };
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                // Indexed.
                let (index, rest) = integer(block, 7)?;
                block = rest;
                let (name, value) = self.entry(index)?;
                field(name, value)?;
            } else if first & 0xe0 == 0x20 {
                // A dynamic table size update, only before the fields.
                let (size, rest) = integer(block, 5)?;
                block = rest;
                if fields > 0 {
                    return Err(DecodeError::LateSizeUpdate);
                }
                if size > self.allowed {
                    return Err(DecodeError::TableSize(size));
                }
                self.max = size;
                self.evict(0);
                continue;
            } else {
                // A literal: with incremental indexing (01), or without
                // indexing (0000) or never indexed (0001).
                let indexing = first & 0xc0 == 0x40;
                let (index, rest) = integer(block, if indexing { 6 } else { 4 })?;
                block = rest;
                let name = if index == 0 {
                    let (name, rest) = string(block)?;
                    block = rest;
                    name
                } else {
                    self.entry(index)?.0.to_vec()
                };
                let (value, rest) = string(block)?;
                block = rest;
                field(&name, &value)?;
                if indexing {
                    self.insert(name, value);
                }
            }
            fields += 1;
        }
        Ok(())
    }

    /// The field at `index` (1-based: the static table, then the dynamic
    /// table newest first).
    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        if let Some(&(name, value)) = index.checked_sub(1).and_then(|i| STATIC.get(i)) {
            return Ok((name.as_bytes(), value.as_bytes()));
        }
        index
            .checked_sub(STATIC.len() + 1)
            .and_then(|i| self.table.get(i))
            .map(|(n, v)| (&n[..], &v[..]))
            .ok_or(DecodeError::Index(index))
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        self.evict(size);
        // An entry larger than the table empties it and is not added.
        if size <= self.max {
            self.size += size;
            self.table.push_front((name, value));
        }
    }

    /// Drops the oldest entries until `room` more bytes fit (or none is left).
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((n, v)) = self.table.pop_back() else {
                self.size = 0;
                return;
            };
            self.size -= n.len() + v.len() + 32;
        }
    }
}

/// An integer with an `n`-bit prefix (RFC 7541 section 5.1), and the rest
/// of the block; at most 2^28 (more is an error: no length or index here
/// comes near it).
fn integer(block: &[u8], n: u32) -> Result<(usize, &[u8]), DecodeError> {
    let (&first, mut rest) = block.split_first().ok_or(DecodeError::Truncated)?;
    let max = (1usize << n) - 1;
    let mut v = usize::from(first) & max;
    if v < max {
        return Ok((v, rest));
    }
    let mut shift = 0;
    loop {
        let (&b, r) = rest.split_first().ok_or(DecodeError::Truncated)?;
        rest = r;
        v += usize::from(b & 0x7f) << shift;
        if v > 1 << 28 {
            return Err(DecodeError::Integer);
        }
        if b & 0x80 == 0 {
            return Ok((v, rest));
        }
        shift += 7;
        if shift > 28 {
            return Err(DecodeError::Integer);
        }
    }
}

/// A string literal (raw or Huffman-coded), and the rest of the block.
fn string(block: &[u8]) -> Result<(Vec<u8>, &[u8]), DecodeError> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let (len, rest) = integer(block, 7)?;
    if len > rest.len() {
        return Err(DecodeError::Truncated);
    }
    let (s, rest) = rest.split_at(len);
    let s = if huffman { huffman_decode(s)? } else { s.to_vec() };
    Ok((s, rest))
}

/// The length of each symbol's code (RFC 7541 Appendix B), symbols 0 to
/// 255 and EOS (256). The code is canonical: codes of one length are
/// consecutive in the order of their symbols, each length's first code
/// follows the last of the length before.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28,
    28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12,
    10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6,
    5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22,
    22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20,
    22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28,
    27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28,
    27, 27, 27, 27, 27, 26, 30,
];

const EOS: u16 = 256;
const LONGEST: usize = 30;

/// The code, for decoding: per length, the first code and where its
/// symbols start in `symbols`, and the end of the length's codes as a
/// 32-bit left-aligned number (a code's length is the first whose end
/// lies above the next 32 bits of the input).
struct Code {
    first: [u32; LONGEST + 1],
    start: [usize; LONGEST + 1],
    end: [u64; LONGEST + 1],
    /// Symbols in the order of their codes.
    symbols: Vec<u16>,
}

static CODE: LazyLock<Code> = LazyLock::new(|| {
    let mut symbols: Vec<u16> = (0..=EOS).collect();
    symbols.sort_by_key(|&s| (CODE_LENGTHS[usize::from(s)], s));
    let mut code = Code {
        first: [0; LONGEST + 1],
        start: [0; LONGEST + 1],
        end: [0; LONGEST + 1],
        symbols,
    };
    let mut next = 0u32;
    let mut at = 0usize;
    for len in 1..=LONGEST {
        let count = CODE_LENGTHS.iter().filter(|&&l| usize::from(l) == len).count();
        code.first[len] = next;
        code.start[len] = at;
        let count32 = u32::try_from(count).unwrap_or(u32::MAX);
        code.end[len] = u64::from(next + count32) << (32 - len);
        at += count;
        next = (next + count32) << 1;
    }
    code
});

/// Decodes a Huffman-coded string (RFC 7541 section 5.2).
pub fn huffman_decode(input: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let code = &*CODE;
    let mut out = Vec::with_capacity(input.len() * 8 / 5 + 1);
    // Bits not yet decoded, right-aligned in `acc`: `bits` of them.
    let (mut acc, mut bits) = (0u64, 0usize);
    let mut bytes = input.iter();
    loop {
        while bits <= 56 {
            let Some(&b) = bytes.next() else { break };
            acc = acc << 8 | u64::from(b);
            bits += 8;
        }
        if bits == 0 {
            return Ok(out);
        }
        if bits < LONGEST && acc == (1u64 << bits) - 1 {
            // What is left is padding: the start of EOS, at most 7 bits.
            return if bits <= 7 {
                Ok(out)
            } else {
                Err(DecodeError::Huffman("padding longer than 7 bits"))
            };
        }
        // The next 32 bits, left-aligned (padded with ones past the end).
        let peek = if bits >= 32 {
            (acc >> (bits - 32)) & 0xffff_ffff
        } else {
            (acc << (32 - bits) | ((1u64 << (32 - bits)) - 1)) & 0xffff_ffff
        };
        let len = (5..=LONGEST)
            .find(|&l| peek < code.end[l])
            .ok_or(DecodeError::Huffman("no such code"))?;
        if len > bits {
            return Err(DecodeError::Huffman("a code cut short"));
        }
        let value = u32::try_from(peek >> (32 - len)).map_err(|_| DecodeError::Huffman("no such code"))?;
        let index = code.start[len] + usize::try_from(value - code.first[len]).unwrap_or(usize::MAX);
        let symbol = *code.symbols.get(index).ok_or(DecodeError::Huffman("no such code"))?;
        let Ok(byte) = u8::try_from(symbol) else {
            return Err(DecodeError::Huffman("the EOS symbol"));
        };
        out.push(byte);
        bits -= len;
        acc &= (1u64 << bits) - 1;
    }
}

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Each symbol's code, from the lengths (as an encoder has it).
    fn codes() -> Vec<(u32, usize)> {
        let code = &*CODE;
        let mut out = vec![(0, 0); 257];
        for (i, &s) in code.symbols.iter().enumerate() {
            let len = usize::from(CODE_LENGTHS[usize::from(s)]);
            let value = code.first[len] + u32::try_from(i - code.start[len]).unwrap();
            out[usize::from(s)] = (value, len);
        }
        out
    }

    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let codes = codes();
        let (mut acc, mut bits, mut out) = (0u64, 0usize, Vec::new());
        for &b in s {
            let (value, len) = codes[usize::from(b)];
            acc = acc << len | u64::from(value);
            bits += len;
            while bits >= 8 {
                out.push(u8::try_from((acc >> (bits - 8)) & 0xff).unwrap());
                bits -= 8;
            }
        }
        if bits > 0 {
            // Padded with the start of EOS (ones).
            out.push(u8::try_from(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) & 0xff).unwrap());
        }
        out
    }

    /// A small deterministic generator (no dependency).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Up to `max - 1` bytes.
        fn bytes(&mut self, max: u64) -> Vec<u8> {
            let n = self.next() % max;
            (0..n).map(|_| (self.next() & 0xff) as u8).collect()
        }
    }

    #[test]
    fn the_code_is_rfc_7541s() {
        let codes = codes();
        // A few codes of Appendix B, the shortest, longest and EOS.
        assert_eq!(codes[usize::from(b'0')], (0x0, 5));
        assert_eq!(codes[usize::from(b'a')], (0x3, 5));
        assert_eq!(codes[usize::from(b' ')], (0x14, 6));
        assert_eq!(codes[usize::from(b'~')], (0x1ffd, 13));
        assert_eq!(codes[0], (0x1ff8, 13));
        assert_eq!(codes[256], (0x3fff_ffff, 30));
        // And each code the same as loona-hpack's decoder reads it.
        for b in 0..=255u8 {
            let one = huffman_encode(&[b]);
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&one).unwrap();
            assert_eq!(theirs, [b], "symbol {b}");
            assert_eq!(huffman_decode(&one).unwrap(), [b], "symbol {b}");
        }
    }

    #[test]
    fn huffman_strings_decode_as_a_reference_decoder_does() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..3000 {
            let s = rng.bytes(64);
            let coded = huffman_encode(&s);
            assert_eq!(huffman_decode(&coded).unwrap(), s, "round {round}");
            // Arbitrary bytes: the same answer as loona-hpack's (Ok and
            // the same string, or an error).
            let junk = rng.bytes(24);
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&junk).ok();
            assert_eq!(huffman_decode(&junk).ok(), theirs, "{junk:02x?}");
        }
    }

    #[test]
    fn bad_huffman_strings_are_errors() {
        // Eight bits of padding ('0' is 5 zero bits, then 11 ones).
        assert_eq!(
            huffman_decode(&[0x07, 0xff]),
            Err(DecodeError::Huffman("padding longer than 7 bits"))
        );
        // Padding of zeros: a code cut short.
        assert!(huffman_decode(&[0x00]).is_err());
        // EOS itself (30 ones, then two of padding).
        assert_eq!(huffman_decode(&[0xff; 4]), Err(DecodeError::Huffman("the EOS symbol")));
        assert_eq!(huffman_decode(&[]), Ok(Vec::new()));
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn fields(d: &mut Decoder, block: &[u8]) -> Result<Fields, DecodeError> {
        let mut got = Vec::new();
        d.decode(block, 1 << 20, |n, v| got.push((n.to_vec(), v.to_vec())))?;
        Ok(got)
    }

    #[test]
    fn blocks_decode_as_a_reference_decoder_does() {
        // Blocks from loona-hpack's encoder (indexing into the dynamic
        // table, blocks leaning on the ones before), and every static entry.
        let mut rng = Rng(7);
        let (mut ours, mut theirs) = (Decoder::new(4096), loona_hpack::Decoder::new());
        let mut enc = loona_hpack::Encoder::new();
        for _ in 0..300 {
            let headers: Fields = (0..rng.next() % 8)
                .map(|_| {
                    let name = format!("x-{}", rng.next() % 20).into_bytes();
                    let value = rng.bytes(300);
                    (name, value)
                })
                .chain([(b":authority".to_vec(), b"localhost".to_vec())])
                .collect();
            let block = enc.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
            let got = fields(&mut ours, &block).unwrap();
            assert_eq!(got, theirs.decode(&block).unwrap());
            assert_eq!(got, headers);
        }
        let all: Vec<u8> = (1..=61u8).map(|i| 0x80 | i).collect();
        assert_eq!(
            fields(&mut Decoder::new(4096), &all).unwrap(),
            loona_hpack::Decoder::new().decode(&all).unwrap()
        );
    }

    #[test]
    fn literals_of_every_kind_and_the_table_bound() {
        let mut d = Decoder::new(4096);
        // With indexing (new name), then the entry by index 62.
        let mut block = vec![0x40, 3, b'a', b'b', b'c', 2, b'x', b'y', 0x80 | 62];
        // Without indexing and never indexed, with an indexed name (:path).
        block.extend_from_slice(&[0x04, 1, b'/', 0x14, 1, b'q']);
        let got = fields(&mut d, &block).unwrap();
        let want: Fields = [("abc", "xy"), ("abc", "xy"), (":path", "/"), (":path", "q")]
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(got, want);
        // Only the one indexed literal went into the table.
        assert_eq!(fields(&mut d, &[0x80 | 63]), Err(DecodeError::Index(63)));
        // A size update to 0 empties it, and must come first.
        assert_eq!(fields(&mut d, &[0x20, 0x80 | 62]), Err(DecodeError::Index(62)));
        assert_eq!(fields(&mut d, &[0x82, 0x20]), Err(DecodeError::LateSizeUpdate));
        // Past the allowed size (4096 = 31 + 4065: 0x3f then 0xe1 0x1f).
        assert_eq!(fields(&mut d, &[0x3f, 0xe2, 0x1f]), Err(DecodeError::TableSize(4097)));
        assert_eq!(fields(&mut d, &[0x3f, 0xe1, 0x1f]), Ok(Vec::new()));
        // Entries are evicted oldest first to stay within the size: 100
        // entries of 32 + 2 + 40 bytes leave 55 in 4096.
        let mut d = Decoder::new(4096);
        for i in 0..100u8 {
            let mut b = vec![0x40, 2, b'n', i, 40];
            b.extend_from_slice(&[b'v'; 40]);
            fields(&mut d, &b).unwrap();
        }
        assert_eq!(d.table.len(), 4096 / 74);
        assert!(d.size <= 4096);
        assert_eq!(fields(&mut d, &[0x80 | 62]).unwrap()[0].0, [b'n', 99]);
        // An entry larger than the table empties it.
        let mut b = vec![0x40, 1, b'n', 0x7f, 0x80, 0x20];
        b.extend_from_slice(&[b'v'; 4223]);
        fields(&mut d, &b).unwrap();
        assert!(d.table.is_empty() && d.size == 0);
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut d = Decoder::new(4096);
        assert_eq!(fields(&mut d, &[0x80]), Err(DecodeError::Index(0)));
        assert_eq!(fields(&mut d, &[0xff, 0x80]), Err(DecodeError::Truncated));
        assert_eq!(
            fields(&mut d, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(DecodeError::Integer)
        );
        assert_eq!(fields(&mut d, &[0x00, 5, b'a']), Err(DecodeError::Truncated));
        assert_eq!(fields(&mut d, &[0x00, 1, b'a']), Err(DecodeError::Truncated));
        assert_eq!(fields(&mut d, &[0x00, 1, b'a', 0x81, 0x00]).map_err(|_| ()), Err(()));
    }

    #[test]
    fn a_small_block_cannot_name_a_large_entry_without_bound() {
        // One entry of 4,000 bytes, then 60,000 references to it: 240 MB
        // of fields from a 60 KB block, refused at the limit.
        let mut d = Decoder::new(4096);
        let mut b = vec![0x40, 1, b'n', 0x7f, 0xa1, 0x1e];
        b.extend_from_slice(&[b'v'; 4000]);
        b.extend(std::iter::repeat_n(0x80 | 62, 60_000));
        let mut seen = 0usize;
        let r = d.decode(&b, 128 << 10, |n, v| seen += n.len() + v.len());
        assert_eq!(r, Err(DecodeError::TooLarge(128 << 10)));
        assert!(seen <= 128 << 10, "{seen}");
    }
}
