//! Any `:authority` on the Unix socket.
//!
//! gRPC clients disagree on what `:authority` to send over a Unix socket:
//! grpc-go and grpc-js send `localhost`, gRPC C-core (Python, Ruby, PHP,
//! C++) the percent-encoded socket path (`run%2Fwarden%2Fwarden.sock`),
//! grpc-java the raw path. On a Unix socket the authority means nothing,
//! but the HTTP/2 layer under tonic (h2) rejects the last two as malformed
//! (RST_STREAM PROTOCOL_ERROR) and has no option to do otherwise. So this
//! layer sits between the socket and it: it reads the client's frames,
//! decodes each header block with the client's HPACK state, sets
//! `:authority` to `localhost`, and passes the block on re-encoded as
//! literals without indexing (so h2's own decoder needs no table of the
//! client's), split into frames h2 takes. Every other frame passes
//! through as it came; what the daemon writes is not touched.
//!
//! Must never: hold more than a frame and one header block of a client's
//! (a larger frame or block ends the connection), pass a header block on
//! that it could not decode, or change anything but `:authority`; nor let
//! a block cost more than a constant per byte (decoding is
//! [`super::hpack`]'s, which holds the fields of a block to twice its
//! largest size).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What `:authority` becomes.
const AUTHORITY: &[u8] = b"localhost";
/// The client connection preface (RFC 9113 section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame h2 takes from clients (its SETTINGS_MAX_FRAME_SIZE,
/// the default), and so the largest this layer reads whole or writes.
pub const MAX_FRAME: usize = 16_384;
/// The largest header block (all its frames) this layer holds: several
/// times the daemon's 16 KiB of headers, as HPACK may expand or shrink.
const MAX_BLOCK: usize = 64 << 10;
/// The dynamic table clients may use: the default, as h2 announces no
/// other SETTINGS_HEADER_TABLE_SIZE.
const TABLE_SIZE: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A client connection whose header blocks carry `:authority: localhost`.
pub struct AnyAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    /// Read from the client, not yet rewritten.
    raw: BytesMut,
    eof: bool,
}

impl<S> std::fmt::Debug for AnyAuthority<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnyAuthority").finish_non_exhaustive()
    }
}

impl<S> AnyAuthority<S> {
    pub fn new(inner: S) -> Self {
        AnyAuthority {
            inner,
            rewriter: Rewriter::new(),
            raw: BytesMut::with_capacity(8 << 10),
            eof: false,
        }
    }
}

/// The inbound half: the client's bytes in, the rewritten bytes out.
pub struct Rewriter {
    decoder: super::hpack::Decoder,
    /// Bytes still to pass through unread: the preface, then those of the
    /// current frame.
    passing: usize,
    /// A header block being gathered: its stream, whether it ends the
    /// stream, and its fragments so far.
    block: Option<(u32, bool, Vec<u8>)>,
    /// Ready for the reader.
    out: BytesMut,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter").finish_non_exhaustive()
    }
}

fn protocol(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2 from a client: {what}"))
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        Rewriter {
            decoder: super::hpack::Decoder::new(TABLE_SIZE),
            // The preface passes as it is (h2 checks it).
            passing: PREFACE.len(),
            block: None,
            out: BytesMut::new(),
        }
    }

    /// Takes what can be rewritten from `raw` (leaving a partial frame
    /// there) and adds the result to what [`Rewriter::take`] gives.
    pub fn feed(&mut self, raw: &mut BytesMut) -> io::Result<()> {
        loop {
            if self.passing > 0 {
                let n = self.passing.min(raw.len());
                self.out.extend_from_slice(&raw.split_to(n));
                self.passing -= n;
                if self.passing > 0 {
                    return Ok(());
                }
            }
            if raw.len() < 9 {
                return Ok(());
            }
            let len = usize::from(raw[0]) << 16 | usize::from(raw[1]) << 8 | usize::from(raw[2]);
            let (kind, flags) = (raw[3], raw[4]);
            let stream = u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) & 0x7fff_ffff;
            let header_frame = kind == HEADERS || kind == CONTINUATION;
            if !header_frame {
                if self.block.is_some() {
                    return Err(protocol("a frame inside a header block"));
                }
                // Passes through, as much of it as there is.
                self.passing = 9 + len;
                continue;
            }
            if len > MAX_FRAME {
                return Err(protocol("a header frame larger than the largest frame"));
            }
            if raw.len() < 9 + len {
                return Ok(());
            }
            raw.advance(9);
            let payload = raw.split_to(len);
            self.header_frame(kind, flags, stream, &payload)?;
        }
    }

    /// The rewritten bytes so far.
    pub fn take(&mut self) -> BytesMut {
        self.out.split()
    }

    fn header_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> io::Result<()> {
        let fragment = if kind == HEADERS {
            if self.block.is_some() {
                return Err(protocol("HEADERS inside a header block"));
            }
            let mut p = payload;
            let pad = if flags & PADDED != 0 {
                let (&n, rest) = p.split_first().ok_or_else(|| protocol("a padded frame too short"))?;
                p = rest;
                usize::from(n)
            } else {
                0
            };
            if flags & PRIORITY != 0 {
                // Priority is advice h2 does not follow; it is dropped.
                p = p.get(5..).ok_or_else(|| protocol("a priority frame too short"))?;
            }
            let fragment = p
                .get(
                    ..p.len()
                        .checked_sub(pad)
                        .ok_or_else(|| protocol("padding longer than the frame"))?,
                )
                .unwrap_or_default();
            self.block = Some((stream, flags & END_STREAM != 0, Vec::new()));
            fragment
        } else {
            match &self.block {
                Some((s, _, _)) if *s == stream => payload,
                _ => return Err(protocol("CONTINUATION outside its header block")),
            }
        };
        let Some((_, _, block)) = self.block.as_mut() else {
            return Err(protocol("a header block that went missing"));
        };
        if block.len() + fragment.len() > MAX_BLOCK {
            return Err(protocol("a header block larger than the daemon holds"));
        }
        block.extend_from_slice(fragment);
        if flags & END_HEADERS != 0 {
            let (stream, end_stream, block) = self.block.take().unwrap_or_default();
            self.pass_block(stream, end_stream, &block)?;
        }
        Ok(())
    }

    /// Decodes a whole header block, sets `:authority`, and writes it as
    /// HEADERS and CONTINUATION frames.
    fn pass_block(&mut self, stream: u32, end_stream: bool, block: &[u8]) -> io::Result<()> {
        let mut encoded = Vec::with_capacity(block.len() + 64);
        let mut failed = false;
        // Fields of at most twice the largest block: a few bytes may name
        // a table entry of kilobytes, many times.
        self.decoder
            .decode(block, MAX_BLOCK * 2, |name, value| {
                let value = if name == b":authority" { AUTHORITY } else { value };
                if literal(&mut encoded, name, value).is_err() {
                    failed = true;
                }
            })
            .map_err(|e| protocol(&format!("an undecodable header block ({e})")))?;
        if failed {
            return Err(protocol("a header block larger than the daemon holds"));
        }
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut first = true;
        // An empty block is still one HEADERS frame.
        let empty: &[u8] = &[];
        let mut next = chunks.next().or(Some(empty));
        while let Some(chunk) = next {
            next = chunks.next();
            let last = next.is_none();
            let mut flags = if last { END_HEADERS } else { 0 };
            if first && end_stream {
                flags |= END_STREAM;
            }
            let kind = if first { HEADERS } else { CONTINUATION };
            let len = u32::try_from(chunk.len()).map_err(|_| protocol("a frame too large"))?;
            self.out.put_slice(&len.to_be_bytes()[1..]);
            self.out.put_u8(kind);
            self.out.put_u8(flags);
            self.out.put_u32(stream);
            self.out.put_slice(chunk);
            first = false;
        }
        Ok(())
    }
}

/// Appends a header as a literal without indexing, with a literal name,
/// neither string Huffman-coded (RFC 7541 section 6.2.2).
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) -> Result<(), ()> {
    out.push(0);
    string(out, name)?;
    string(out, value)
}

fn string(out: &mut Vec<u8>, s: &[u8]) -> Result<(), ()> {
    integer(out, s.len(), 7, 0)?;
    out.extend_from_slice(s);
    Ok(())
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1).
fn integer(out: &mut Vec<u8>, mut v: usize, n: u32, flags: u8) -> Result<(), ()> {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | u8::try_from(v).map_err(drop)?);
        return Ok(());
    }
    out.push(flags | u8::try_from(max).map_err(drop)?);
    v -= max;
    while v >= 128 {
        out.push(u8::try_from(v % 128).map_err(drop)? | 0x80);
        v /= 128;
    }
    out.push(u8::try_from(v).map_err(drop)?);
    Ok(())
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let ready = this.rewriter.out.len();
            if ready > 0 {
                let n = ready.min(buf.remaining());
                buf.put_slice(&this.rewriter.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Room for a frame and its header at most: a partial frame
            // waits here for the rest.
            let mut chunk = [0u8; 8 << 10];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        this.eof = true;
                        continue;
                    }
                    this.raw.extend_from_slice(got);
                    this.rewriter.feed(&mut this.raw)?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client writes it.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// What comes out for `input` fed in pieces of `step` bytes.
    fn rewrite(input: &[u8], step: usize) -> io::Result<Vec<u8>> {
        let mut r = Rewriter::new();
        let mut raw = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            raw.extend_from_slice(piece);
            r.feed(&mut raw)?;
            out.extend_from_slice(&r.take());
        }
        Ok(out)
    }

    /// The frames of `bytes` (after the preface): kind, flags, stream, payload.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        bytes = &bytes[PREFACE.len()..];
        let mut v = Vec::new();
        while !bytes.is_empty() {
            let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            v.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        v
    }

    fn request(authority: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), b"/grpc.health.v1.Health/Check".to_vec()),
            (b":authority".to_vec(), authority.to_vec()),
            (b"te".to_vec(), b"trailers".to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
        ]
    }

    #[test]
    fn every_authority_becomes_localhost_and_the_rest_stays() {
        // Blocks encoded with indexing, so the second leans on the
        // client's dynamic table from the first; data in between.
        let mut enc = loona_hpack::Encoder::new();
        let first = enc.encode(
            request(b"run%2Fwarden%2Fwarden.sock")
                .iter()
                .map(|(n, v)| (&n[..], &v[..])),
        );
        let second = enc.encode(
            request(b"/run/warden/warden.sock")
                .iter()
                .map(|(n, v)| (&n[..], &v[..])),
        );
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        for step in [1, 7, 4096] {
            let out = rewrite(&input, step).unwrap();
            assert!(out.starts_with(PREFACE));
            let got = frames(&out);
            assert_eq!(got.len(), 4, "{got:?}");
            assert_eq!(
                (got[0].0, &got[0].3[..]),
                (0x4, &[0u8, 3, 0, 0, 0, 100][..]),
                "SETTINGS untouched"
            );
            assert_eq!(
                (got[2].0, got[2].1, &got[2].3[..]),
                (0x0, END_STREAM, &b"\0\0\0\0\0"[..])
            );
            let mut dec = loona_hpack::Decoder::new();
            for (i, stream, flags) in [(1, 1, END_HEADERS), (3, 3, END_HEADERS | END_STREAM)] {
                assert_eq!((got[i].0, got[i].1, got[i].2), (HEADERS, flags, stream));
                assert_eq!(dec.decode(&got[i].3).unwrap(), request(b"localhost"));
            }
        }
    }

    #[test]
    fn continuation_padding_and_priority_are_read_and_large_blocks_split() {
        let mut headers = request(b"%2Ftmp%2Fx");
        headers.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let block = loona_hpack::Encoder::new().encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
        // HEADERS with padding and priority carrying the first 100 bytes,
        // the rest in CONTINUATION frames.
        let mut first = vec![3u8];
        first.extend_from_slice(&[0, 0, 0, 0, 16]);
        first.extend_from_slice(&block[..100]);
        first.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &first));
        let rest: Vec<&[u8]> = block[100..].chunks(MAX_FRAME).collect();
        for (i, c) in rest.iter().enumerate() {
            let flags = if i + 1 == rest.len() { END_HEADERS } else { 0 };
            input.extend(frame(CONTINUATION, flags, 5, c));
        }
        let got = frames(&rewrite(&input, 1000).unwrap());
        assert!(got.len() >= 3, "split into frames h2 takes");
        assert!(got.iter().all(|f| f.3.len() <= MAX_FRAME && f.2 == 5));
        assert_eq!((got[0].0, got[0].1), (HEADERS, END_STREAM));
        assert!(got[1..].iter().all(|f| f.0 == CONTINUATION));
        assert_eq!(got.last().unwrap().1, END_HEADERS);
        let joined: Vec<u8> = got.iter().flat_map(|f| f.3.clone()).collect();
        let mut expected = headers.clone();
        expected[3].1 = b"localhost".to_vec();
        assert_eq!(loona_hpack::Decoder::new().decode(&joined).unwrap(), expected);
    }

    #[test]
    fn bad_frames_end_the_connection() {
        let block = loona_hpack::Encoder::new().encode(request(b"x").iter().map(|(n, v)| (&n[..], &v[..])));
        let with = |frames: &[Vec<u8>]| {
            let mut input = PREFACE.to_vec();
            for f in frames {
                input.extend_from_slice(f);
            }
            rewrite(&input, 3)
        };
        // Not HPACK; a CONTINUATION of nothing; another frame inside a
        // block; a header frame larger than h2 takes; a table larger than
        // allowed; padding longer than the frame.
        for bad in [
            vec![frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff])],
            vec![frame(CONTINUATION, END_HEADERS, 1, &block)],
            vec![frame(HEADERS, 0, 1, &block), frame(0x0, 0, 1, b"x")],
            vec![frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_FRAME + 1])],
            vec![frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x7f])],
            vec![frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82])],
        ] {
            assert_eq!(with(&bad).unwrap_err().kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
        // A block that never ends grows no further than MAX_BLOCK.
        let endless: Vec<Vec<u8>> = std::iter::once(frame(HEADERS, 0, 1, &[0x82]))
            .chain((0..8).map(|_| frame(CONTINUATION, 0, 1, &vec![0x82; MAX_FRAME])))
            .collect();
        assert!(with(&endless).is_err());
    }

    #[test]
    fn data_passes_through_without_being_held() {
        // A DATA frame larger than any header frame, fed a byte at a time:
        // each byte is passed on as it comes.
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x0, 0, 1, &vec![7; 100_000]));
        let mut r = Rewriter::new();
        let mut raw = BytesMut::new();
        let mut total = 0;
        for b in &input {
            raw.extend_from_slice(&[*b]);
            r.feed(&mut raw).unwrap();
            total += r.take().len();
            assert!(raw.len() < 9, "held {} bytes", raw.len());
        }
        assert_eq!(total, input.len());
    }
}
