//! SPDY/3.1 framing for the kubelet streaming protocol, the transport kubectl uses for
//! exec/attach when WebSockets are off (`KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`) or fail.
//!
//! Pure codec, no I/O: [`Codec::parse`] takes bytes read from the connection and returns whole
//! frames; `encode_*` build frames to write. Header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are
//! zlib streams primed with the SPDY/3 dictionary, one stream per direction for the whole
//! connection (each block ends with a sync flush), as draft 3 section 2.6.10 specifies.
//!
//! Flow control (WINDOW_UPDATE, SETTINGS) is parsed and ignored: Go's spdystream, kubectl's
//! client, neither enforces nor sends windows.
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// SPDY version carried in every control frame.
const VERSION: u16 = 3;
pub const SYN_STREAM: u16 = 1;
pub const SYN_REPLY: u16 = 2;
pub const RST_STREAM: u16 = 3;
pub const SETTINGS: u16 = 4;
pub const PING: u16 = 6;
pub const GOAWAY: u16 = 7;
pub const HEADERS: u16 = 8;
pub const WINDOW_UPDATE: u16 = 9;
/// FLAG_FIN on data and control frames: the sender's half of the stream is done.
pub const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status: the stream was refused / protocol error.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_REFUSED_STREAM: u32 = 3;
/// A frame's payload is at most 2^24 - 1 bytes; larger payloads are refused.
const MAX_PAYLOAD: usize = (1 << 24) - 1;
/// Header blocks larger than this (decompressed) are refused.
const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1): 1423 bytes.
const DICTIONARY: &[u8] = b"\
    \x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\
    \x00\x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-char\
    set\x00\x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\x0daccept-\
    ranges\x00\x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\x0dauthorization\x00\x00\x00\
    \x0dcache-control\x00\x00\x00\x0aconnection\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10c\
    ontent-encoding\x00\x00\x00\x10content-language\x00\x00\x00\x0econtent-length\x00\x00\
    \x00\x10content-location\x00\x00\x00\x0bcontent-md5\x00\x00\x00\x0dcontent-range\x00\x00\
    \x00\x0ccontent-type\x00\x00\x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\
    \x00\x00\x07expires\x00\x00\x00\x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\
    \x00\x00\x11if-modified-since\x00\x00\x00\x0dif-none-match\x00\x00\x00\x08if-range\x00\
    \x00\x00\x13if-unmodified-since\x00\x00\x00\x0dlast-modified\x00\x00\x00\x08location\x00\
    \x00\x00\x0cmax-forwards\x00\x00\x00\x06pragma\x00\x00\x00\x12proxy-authenticate\x00\x00\
    \x00\x13proxy-authorization\x00\x00\x00\x05range\x00\x00\x00\x07referer\x00\x00\x00\x0br\
    etry-after\x00\x00\x00\x06server\x00\x00\x00\x02te\x00\x00\x00\x07trailer\x00\x00\x00\
    \x11transfer-encoding\x00\x00\x00\x07upgrade\x00\x00\x00\x0auser-agent\x00\x00\x00\x04va\
    ry\x00\x00\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10www-authenticate\x00\x00\x00\
    \x06method\x00\x00\x00\x03get\x00\x00\x00\x06status\x00\x00\x00\x06200 OK\x00\x00\x00\
    \x07version\x00\x00\x00\x08HTTP/1.1\x00\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\
    \x0aset-cookie\x00\x00\x00\x0akeep-alive\x00\x00\x00\x06origin10010120120220520630030230\
    3304305306307402405406407408409410411412413414415416417502504505203 Non-Authoritative In\
    formation204 No Content301 Moved Permanently400 Bad Request401 Unauthorized403 Forbidden\
    404 Not Found500 Internal Server Error501 Not Implemented503 Service UnavailableJan Feb \
    Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT\
    chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,te\
    xt/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-\
    8859-1,utf-,*,enq=0.\
";

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A new stream from the peer with its headers (names lowercase, as SPDY requires).
    SynStream {
        stream_id: u32,
        fin: bool,
        headers: Vec<(String, String)>,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Vec<(String, String)>,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Vec<(String, String)>,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    /// SETTINGS, WINDOW_UPDATE and unknown control types: nothing to do.
    Ignored {
        frame_type: u16,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpdyError {
    #[error("control frame with SPDY version {0}, only version 3 is spoken")]
    Version(u16),
    #[error("frame payload of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("{kind} frame of {len} bytes is too short")]
    Short { kind: &'static str, len: usize },
    #[error("header block cannot be decompressed: {0}")]
    Compression(String),
    #[error("malformed header block: {0}")]
    HeaderBlock(&'static str),
}

/// The per-connection state: the two header compression contexts.
pub struct Codec {
    inflate: Decompress,
    deflate: Compress,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Codec {
    pub fn new() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate.set_dictionary(DICTIONARY).expect("a fresh deflate stream takes a dictionary");
        Self { inflate: Decompress::new(true), deflate }
    }

    /// Decodes the first whole frame of `buf`: `Ok(None)` when more bytes are needed, else the
    /// frame and how many bytes it used.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Frame, usize)>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let flags = buf[4];
        let len = (usize::from(buf[5]) << 16) | (usize::from(buf[6]) << 8) | usize::from(buf[7]);
        if len > MAX_PAYLOAD {
            return Err(SpdyError::TooLarge(len));
        }
        if buf.len() < 8 + len {
            return Ok(None);
        }
        let payload = &buf[8..8 + len];
        let fin = flags & FLAG_FIN != 0;
        let frame = if buf[0] & 0x80 == 0 {
            Frame::Data { stream_id: be32(buf) & 0x7fff_ffff, fin, data: payload.to_vec() }
        } else {
            let version = u16::from_be_bytes([buf[0] & 0x7f, buf[1]]);
            if version != VERSION {
                return Err(SpdyError::Version(version));
            }
            let frame_type = u16::from_be_bytes([buf[2], buf[3]]);
            let need = |kind: &'static str, n: usize| {
                if len < n { Err(SpdyError::Short { kind, len }) } else { Ok(()) }
            };
            match frame_type {
                SYN_STREAM => {
                    need("SYN_STREAM", 10)?;
                    let headers = self.decode_headers(&payload[10..])?;
                    Frame::SynStream { stream_id: be32(payload) & 0x7fff_ffff, fin, headers }
                }
                SYN_REPLY | HEADERS => {
                    need("SYN_REPLY", 4)?;
                    let stream_id = be32(payload) & 0x7fff_ffff;
                    let headers = self.decode_headers(&payload[4..])?;
                    if frame_type == SYN_REPLY {
                        Frame::SynReply { stream_id, fin, headers }
                    } else {
                        Frame::Headers { stream_id, fin, headers }
                    }
                }
                RST_STREAM => {
                    need("RST_STREAM", 8)?;
                    Frame::RstStream {
                        stream_id: be32(payload) & 0x7fff_ffff,
                        status: be32(&payload[4..]),
                    }
                }
                PING => {
                    need("PING", 4)?;
                    Frame::Ping { id: be32(payload) }
                }
                GOAWAY => {
                    need("GOAWAY", 4)?;
                    let status = if len >= 8 { be32(&payload[4..]) } else { 0 };
                    Frame::GoAway { last_good_stream_id: be32(payload) & 0x7fff_ffff, status }
                }
                other => Frame::Ignored { frame_type: other },
            }
        };
        Ok(Some((frame, 8 + len)))
    }

    /// Inflates one header block (continuing the connection's zlib stream) and splits it into
    /// name/value pairs.
    fn decode_headers(&mut self, compressed: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let mut out = Vec::with_capacity(1024);
        let mut input = compressed;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(SpdyError::HeaderBlock("larger than 64 KiB"));
                }
                out.reserve(out.len());
            }
            let (before_in, before_out) = (self.inflate.total_in(), out.len());
            let result = self.inflate.decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - before_in) as usize;
            input = &input[used..];
            match result {
                Ok(Status::StreamEnd) => break,
                Ok(_) if input.is_empty() && out.len() < out.capacity() => break,
                Ok(_) if used == 0 && out.len() == before_out && out.len() < out.capacity() => {
                    return Err(SpdyError::Compression("no progress".into()));
                }
                Ok(_) => {}
                Err(err) if err.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| SpdyError::Compression(e.to_string()))?;
                }
                Err(err) => return Err(SpdyError::Compression(err.to_string())),
            }
        }
        parse_header_block(&out)
    }

    fn encode_headers(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut plain = Vec::new();
        plain.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            for s in [name, value] {
                plain.extend_from_slice(&(s.len() as u32).to_be_bytes());
                plain.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = plain.as_slice();
        loop {
            if out.len() == out.capacity() {
                out.reserve(256);
            }
            let before_in = self.deflate.total_in();
            let status = self
                .deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .expect("deflate into a growing buffer does not fail");
            input = &input[(self.deflate.total_in() - before_in) as usize..];
            // Done when all input is consumed and the flush left room to spare.
            if input.is_empty() && out.len() < out.capacity() && status != Status::BufError {
                break;
            }
        }
        out
    }

    /// SYN_REPLY accepting `stream_id`.
    pub fn encode_syn_reply(&mut self, stream_id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let block = self.encode_headers(headers);
        let mut payload = Vec::with_capacity(4 + block.len());
        payload.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
        payload.extend_from_slice(&block);
        control(SYN_REPLY, 0, &payload)
    }
}

fn control(frame_type: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&frame_type.to_be_bytes());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(payload);
    out
}

/// DATA frames for `data` on `stream_id` (split at the frame size limit); `fin` marks the
/// last. An empty `data` with `fin` is the half-close.
pub fn encode_data(stream_id: u32, data: &[u8], fin: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    let mut chunks: Vec<&[u8]> = data.chunks(MAX_PAYLOAD).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
        out.push(if fin && i == last { FLAG_FIN } else { 0 });
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(chunk);
    }
    out
}

pub fn encode_ping(id: u32) -> Vec<u8> {
    control(PING, 0, &id.to_be_bytes())
}

/// WINDOW_UPDATE: the receiver consumed `delta` bytes of `stream_id`, which may send as much
/// again (SPDY/3.1 flow control; the initial window is 64 KiB per stream).
pub fn encode_window_update(stream_id: u32, delta: u32) -> Vec<u8> {
    let mut payload = (stream_id & 0x7fff_ffff).to_be_bytes().to_vec();
    payload.extend((delta & 0x7fff_ffff).to_be_bytes());
    control(9, 0, &payload)
}

pub fn encode_rst_stream(stream_id: u32, status: u32) -> Vec<u8> {
    let mut payload = (stream_id & 0x7fff_ffff).to_be_bytes().to_vec();
    payload.extend_from_slice(&status.to_be_bytes());
    control(RST_STREAM, 0, &payload)
}

pub fn encode_goaway(last_good_stream_id: u32, status: u32) -> Vec<u8> {
    let mut payload = (last_good_stream_id & 0x7fff_ffff).to_be_bytes().to_vec();
    payload.extend_from_slice(&status.to_be_bytes());
    control(GOAWAY, 0, &payload)
}

/// Splits a decompressed header block: a count, then length-prefixed names and values.
/// Several values of one name are joined by NUL in SPDY; they are kept as one string.
fn parse_header_block(block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
    fn next<'a>(rest: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], SpdyError> {
        if rest.len() < 4 || rest.len() - 4 < be32(rest) as usize {
            return Err(SpdyError::HeaderBlock(what));
        }
        let (value, tail) = rest[4..].split_at(be32(rest) as usize);
        *rest = tail;
        Ok(value)
    }
    if block.len() < 4 {
        return Err(SpdyError::HeaderBlock("no pair count"));
    }
    let count = be32(block) as usize;
    let mut rest = &block[4..];
    let mut pairs = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = next(&mut rest, "truncated name")?;
        let value = next(&mut rest, "truncated value")?;
        pairs.push((
            String::from_utf8_lossy(name).to_ascii_lowercase(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in data {
            a = (a + u32::from(byte)) % 65_521;
            b = (b + a) % 65_521;
        }
        (b << 16) | a
    }

    #[test]
    fn the_dictionary_is_the_spdy3_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert_eq!(adler32(DICTIONARY), 0xe3c6_a7c2);
    }

    /// A client codec's SYN_STREAM (as spdystream writes it) for the server codec to parse.
    fn syn_stream(client: &mut Codec, stream_id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let block = client.encode_headers(headers);
        let mut payload = stream_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&block);
        control(SYN_STREAM, 0, &payload)
    }

    #[test]
    fn header_blocks_round_trip_across_frames_of_one_connection() {
        let (mut client, mut server) = (Codec::new(), Codec::new());
        let mut wire = syn_stream(&mut client, 1, &[("streamtype", "error")]);
        wire.extend(syn_stream(&mut client, 3, &[("streamtype", "stdout"), ("x", "y")]));
        wire.extend(encode_data(3, b"hello", true));
        let (first, used) = server.parse(&wire).unwrap().unwrap();
        assert_eq!(
            first,
            Frame::SynStream {
                stream_id: 1,
                fin: false,
                headers: vec![("streamtype".into(), "error".into())]
            }
        );
        // A partial frame waits for more bytes.
        assert_eq!(server.parse(&wire[used..used + 5]).unwrap(), None);
        let (second, used2) = server.parse(&wire[used..]).unwrap().unwrap();
        assert!(
            matches!(second, Frame::SynStream { stream_id: 3, ref headers, .. } if headers.len() == 2)
        );
        let (third, _) = server.parse(&wire[used + used2..]).unwrap().unwrap();
        assert_eq!(third, Frame::Data { stream_id: 3, fin: true, data: b"hello".to_vec() });
        // And the other direction: the server's replies decode on the client's codec.
        let reply = server.encode_syn_reply(3, &[]);
        let again = server.encode_syn_reply(5, &[("a", "b")]);
        assert_eq!(
            client.parse(&reply).unwrap().unwrap().0,
            Frame::SynReply { stream_id: 3, fin: false, headers: vec![] }
        );
        assert_eq!(
            client.parse(&again).unwrap().unwrap().0,
            Frame::SynReply { stream_id: 5, fin: false, headers: vec![("a".into(), "b".into())] }
        );
    }

    #[test]
    fn control_frames_encode_and_bad_frames_are_errors() {
        let mut codec = Codec::new();
        assert_eq!(codec.parse(&encode_ping(7)).unwrap().unwrap().0, Frame::Ping { id: 7 });
        assert_eq!(
            codec.parse(&encode_goaway(5, 0)).unwrap().unwrap().0,
            Frame::GoAway { last_good_stream_id: 5, status: 0 }
        );
        assert_eq!(
            codec.parse(&encode_rst_stream(3, RST_REFUSED_STREAM)).unwrap().unwrap().0,
            Frame::RstStream { stream_id: 3, status: RST_REFUSED_STREAM }
        );
        let window_update = control(WINDOW_UPDATE, 0, &[0, 0, 0, 1, 0, 0, 1, 0]);
        assert_eq!(
            codec.parse(&window_update).unwrap().unwrap().0,
            Frame::Ignored { frame_type: WINDOW_UPDATE }
        );
        let mut v2 = encode_ping(1);
        v2[1] = 2;
        assert_eq!(codec.parse(&v2), Err(SpdyError::Version(2)));
        let short = control(RST_STREAM, 0, &[0, 0, 0, 1]);
        assert!(matches!(codec.parse(&short), Err(SpdyError::Short { .. })));
        let garbage = control(SYN_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
        assert!(matches!(Codec::new().parse(&garbage), Err(SpdyError::Compression(_))));
        assert_eq!(encode_data(1, b"", true), vec![0, 0, 0, 1, FLAG_FIN, 0, 0, 0]);
    }

    #[test]
    fn header_blocks_reject_truncation() {
        assert!(parse_header_block(&[0, 0]).is_err());
        assert!(parse_header_block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        let ok = [0, 0, 0, 1, 0, 0, 0, 1, b'A', 0, 0, 0, 0];
        assert_eq!(parse_header_block(&ok).unwrap(), vec![("a".to_string(), String::new())]);
    }
}
