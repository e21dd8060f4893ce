//! The gRPC codec of every warden service: prost's, with the elements a
//! request's repeated fields may hold bounded on the wire, before prost
//! decodes them.
//!
//! A message decodes to more memory than its bytes: an empty string is 2
//! bytes on the wire and 24 in a `Vec<String>`, so a SpawnRequest of 4 MB
//! could ask for ~100 MB. Counting the entries of the repeated fields of
//! requests first (`command`, `env`, `claude.disallowed_tools`, the same
//! inside an Attach that spawns, `kinds` of Watch) keeps a decoded request
//! within a small multiple of its size. Other messages pass as they are.

use std::any::TypeId;
use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::v1;

/// Most entries of a `command` (the arguments of one program).
pub const MAX_ARGS: usize = 65_536;
/// Most entries of `env`, `claude.disallowed_tools` and Watch's `kinds`.
pub const MAX_ENTRIES: usize = 4_096;

/// [`ProstCodec`], with requests' repeated fields bounded.
#[derive(Debug)]
pub struct Bounded<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Bounded<T, U> {
    fn default() -> Self {
        Bounded(ProstCodec::default())
    }
}

impl<T, U> Codec for Bounded<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(self.0.decoder(), PhantomData)
    }
}

/// [`ProstDecoder`], checking a request's counts first.
#[derive(Debug)]
pub struct BoundedDecoder<U>(ProstDecoder<U>, PhantomData<U>);

impl<U: prost::Message + Default + 'static> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use bytes::Buf;
        // The whole message: tonic hands a decoder one contiguous buffer.
        check::<U>(buf.chunk())?;
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The bounds of message type `U`, checked on its bytes `m`.
fn check<U: 'static>(m: &[u8]) -> Result<(), Status> {
    let id = TypeId::of::<U>();
    let checked = if id == TypeId::of::<v1::SpawnRequest>() {
        spawn_request(m)
    } else if id == TypeId::of::<v1::AttachRequest>() {
        nested(m, 1, |start| nested(start, 5, spawn_request))
    } else if id == TypeId::of::<v1::WatchRequest>() {
        counts(m, &[(4, "kinds", MAX_ENTRIES)])
    } else {
        Ok(())
    };
    checked.map_err(Status::invalid_argument)
}

fn spawn_request(m: &[u8]) -> Result<(), String> {
    counts(m, &[(4, "command", MAX_ARGS), (5, "env", MAX_ENTRIES)])?;
    nested(m, 8, |claude| {
        counts(claude, &[(3, "claude.disallowed_tools", MAX_ENTRIES)])
    })
}

/// The fields of one message on the wire: (field number, the bytes of a
/// length-delimited value, else None). Stops at the first malformed field
/// (prost reports it).
fn fields(mut m: &[u8]) -> impl Iterator<Item = (u64, Option<&[u8]>)> {
    std::iter::from_fn(move || {
        let key = varint(&mut m)?;
        let value = match key & 7 {
            0 => {
                varint(&mut m)?;
                None
            }
            1 => {
                m = m.get(8..)?;
                None
            }
            2 => {
                let len = usize::try_from(varint(&mut m)?).ok()?;
                let (v, rest) = (m.get(..len)?, m.get(len..)?);
                m = rest;
                Some(v)
            }
            5 => {
                m = m.get(4..)?;
                None
            }
            _ => return None,
        };
        Some((key >> 3, value))
    })
}

fn varint(m: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = m.split_first()?;
        *m = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Each (field, name, most) occurs at most `most` times.
fn counts(m: &[u8], limits: &[(u64, &str, usize)]) -> Result<(), String> {
    let mut seen = vec![0usize; limits.len()];
    for (field, _) in fields(m) {
        if let Some(i) = limits.iter().position(|(f, _, _)| *f == field) {
            seen[i] += 1;
            let (_, name, most) = limits[i];
            if seen[i] > most {
                return Err(format!("{name}: at most {most} entries"));
            }
        }
    }
    Ok(())
}

/// `check` of every value of the message field `field`.
fn nested(m: &[u8], field: u64, check: impl Fn(&[u8]) -> Result<(), String>) -> Result<(), String> {
    for (f, value) in fields(m) {
        if let (true, Some(v)) = (f == field, value) {
            check(v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// As the decoder does: the bounds, then prost.
    fn decode<U: Message + Default + 'static>(bytes: &[u8]) -> Result<U, Status> {
        check::<U>(bytes)?;
        U::decode(bytes).map_err(|e| Status::internal(e.to_string()))
    }

    #[test]
    fn requests_hold_at_most_their_bounds() {
        let spawn = |args: usize, env: usize, tools: usize| v1::SpawnRequest {
            user: "u".into(),
            command: vec![String::new(); args],
            env: (0..env).map(|i| (i.to_string(), String::new())).collect(),
            claude: Some(v1::ClaudeOptions {
                disallowed_tools: vec![String::new(); tools],
                ..Default::default()
            }),
            ..Default::default()
        };
        let ok = spawn(MAX_ARGS, MAX_ENTRIES, MAX_ENTRIES);
        assert_eq!(decode::<v1::SpawnRequest>(&ok.encode_to_vec()).unwrap(), ok);
        for (bad, what) in [
            (spawn(MAX_ARGS + 1, 0, 0), "command: at most 65536 entries"),
            (spawn(1, MAX_ENTRIES + 1, 0), "env: at most 4096 entries"),
            (
                spawn(1, 0, MAX_ENTRIES + 1),
                "claude.disallowed_tools: at most 4096 entries",
            ),
        ] {
            let e = decode::<v1::SpawnRequest>(&bad.encode_to_vec()).unwrap_err();
            assert_eq!((e.code(), e.message()), (tonic::Code::InvalidArgument, what));
            // The same inside an Attach that spawns.
            let attach = v1::AttachRequest {
                msg: Some(v1::attach_request::Msg::Start(v1::AttachStart {
                    spawn: Some(bad),
                    ..Default::default()
                })),
            };
            let e = decode::<v1::AttachRequest>(&attach.encode_to_vec()).unwrap_err();
            assert_eq!(e.message(), what);
        }
        let watch = v1::WatchRequest {
            kinds: vec![String::new(); MAX_ENTRIES + 1],
            ..Default::default()
        };
        assert!(decode::<v1::WatchRequest>(&watch.encode_to_vec()).is_err());
        // Other messages, and malformed ones, are prost's to judge.
        let list = v1::ListWorkersResponse {
            workers: vec![v1::Worker::default(); 10],
        };
        assert_eq!(decode::<v1::ListWorkersResponse>(&list.encode_to_vec()).unwrap(), list);
        assert!(decode::<v1::SpawnRequest>(&[0x22, 0x05, b'a']).is_err());
    }
}
