//! The server name of a TLS ClientHello, read from the first bytes a
//! client sends through a tunnel.

/// What the first bytes of a tunnel say about its TLS server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed to see the whole ClientHello record.
    Incomplete,
    /// Not a TLS handshake at all.
    NotTls,
    /// A ClientHello without a server_name extension.
    NoName,
    /// The host name the client asks for.
    Name(String),
    /// A TLS record that is not a well-formed ClientHello.
    Malformed,
}

/// The largest ClientHello record read before giving up: one TLS record.
pub const MAX_HELLO: usize = 5 + (1 << 14);

/// Reads the server name from `buf`, the first bytes of a connection.
pub fn server_name(buf: &[u8]) -> Hello {
    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    const SERVER_NAME: u16 = 0;
    const HOST_NAME: u8 = 0;
    let Some(&first) = buf.first() else {
        return Hello::Incomplete;
    };
    if first != HANDSHAKE {
        return Hello::NotTls;
    }
    if buf.len() < 5 {
        return Hello::Incomplete;
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + len {
        return Hello::Incomplete;
    }
    let mut r = Reader(&buf[5..5 + len]);
    let parse = |r: &mut Reader<'_>| -> Option<Hello> {
        if r.u8()? != CLIENT_HELLO {
            return None;
        }
        let mut h = Reader(r.vec24()?);
        h.take(2 + 32)?; // version, random
        h.vec8()?; // session id
        h.vec16()?; // cipher suites
        h.vec8()?; // compression methods
        if h.0.is_empty() {
            return Some(Hello::NoName);
        }
        let mut ext = Reader(h.vec16()?);
        while !ext.0.is_empty() {
            let kind = ext.u16()?;
            let data = ext.vec16()?;
            if kind != SERVER_NAME {
                continue;
            }
            let mut names = Reader(Reader(data).vec16()?);
            while !names.0.is_empty() {
                let name_type = names.u8()?;
                let name = names.vec16()?;
                if name_type == HOST_NAME {
                    return Some(Hello::Name(String::from_utf8_lossy(name).into_owned()));
                }
            }
        }
        Some(Hello::NoName)
    };
    // A handshake message may span records; warden reads one record and
    // calls a ClientHello that does not fit in it malformed.
    parse(&mut r).unwrap_or(Hello::Malformed)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    /// A vector with a three-byte length.
    fn vec24(&mut self) -> Option<&'a [u8]> {
        let b = self.take(3)?;
        self.take(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal TLS 1.2-style ClientHello record naming `name` (or none).
    pub fn client_hello(name: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(n) = name {
            let n = n.as_bytes();
            let mut sni = Vec::new();
            sni.extend_from_slice(&u16::try_from(n.len() + 3).unwrap().to_be_bytes());
            sni.push(0);
            sni.extend_from_slice(&u16::try_from(n.len()).unwrap().to_be_bytes());
            sni.extend_from_slice(n);
            ext.extend_from_slice(&0u16.to_be_bytes());
            ext.extend_from_slice(&u16::try_from(sni.len()).unwrap().to_be_bytes());
            ext.extend_from_slice(&sni);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // no session id
        body.extend_from_slice(&2u16.to_be_bytes());
        body.extend_from_slice(&[0x13, 0x01]);
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&u16::try_from(ext.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn the_server_name_is_read_from_a_client_hello() {
        let hello = client_hello(Some("github.com"));
        assert_eq!(server_name(&hello), Hello::Name("github.com".into()));
        assert_eq!(server_name(&hello[..20]), Hello::Incomplete);
        assert_eq!(server_name(&client_hello(None)), Hello::NoName);
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        let mut broken = hello.clone();
        broken[6] = 0xff; // a handshake length past the record
        assert_eq!(server_name(&broken), Hello::Malformed);
    }
}
