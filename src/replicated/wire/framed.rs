//! Frames on a byte stream: [`FrameWriter`] encodes, prefixes the length and appends the MAC;
//! [`FrameReader`] checks the length before it allocates, then the MAC, then decodes. A new
//! reader accepts only handshake-sized frames ([`MAX_HANDSHAKE_FRAME_BYTES`]) until the
//! handshake calls [`FrameReader::authenticated`], so a peer that has proved nothing cannot
//! make us allocate more than a few KiB.
//! `ReadTask` runs a reader in its own task so that a connection's `select!` never cancels a
//! read half-way.

use std::io;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::replicated::pages::{to_page_boundary, BufPool};
use crate::replicated::wire::codec;
use crate::replicated::wire::mac::{mac_eq, FrameMac};
use crate::replicated::wire::{
    Frame, ProtoError, MAC_BYTES, MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES,
};

/// Bytes of the length prefix.
const LEN_BYTES: usize = 4;

/// Frames read into a buffer of their own, which the writes they carry then share (rather
/// than copy out of the reader's reused buffer): those longer than this.
const OWN_BUFFER_FRAME_BYTES: usize = 64 << 10;
/// Frame buffers kept for the next frames once their writes are applied.
const FRAME_BUFFERS_KEPT: usize = 4;
/// The largest frame buffer kept: twice a batch's bound on its page data (an eighth of the
/// frame limit, which a batch passes by at most one read's worth), with room for its paths and
/// checksums. A longer frame's buffer is let go.
const KEPT_FRAME_BUFFER_BYTES: usize = MAX_FRAME_BYTES / 4 + (64 << 10);

/// A frame's body, encoded to be sent (and sent again) with
/// [`FrameWriter::send_encoded`]: what a window of unacknowledged frames holds, as small
/// as it is on the wire (a batch of metadata ops takes several times more decoded). A batch's
/// page data is not copied into it: `tail` shares the buffers of its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The body but a batch's tail.
    pub head: Vec<u8>,
    /// A batch's tail, part by part (empty for any other frame).
    pub tail: Vec<Bytes>,
}

impl Encoded {
    /// Bytes of the body.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.iter().map(Bytes::len).sum::<usize>()
    }

    /// Whether the body is empty (never, for an encoded frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `frame`, encoded to be sent and kept: see [`Encoded`].
pub fn encode_body(frame: &Frame) -> Result<Encoded, ProtoError> {
    let mut head = Vec::new();
    let tail = frame.encode_parts(&mut head)?;
    let body = Encoded { head, tail };
    if body.len() > MAX_FRAME_BYTES {
        return Err(ProtoError::TooLarge(body.len()));
    }
    Ok(body)
}

/// Writes frames to a stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    mac: Option<FrameMac>,
    /// Bytes written, for statistics.
    pub bytes: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer without MAC (until [`FrameWriter::set_mac`]).
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            // grows to the largest frame sent: a refusal to a stranger stays small
            buf: Vec::new(),
            mac: None,
            bytes: 0,
        }
    }

    /// From now on, every frame carries a MAC.
    pub fn set_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    /// Encodes and writes one frame (buffered; call [`FrameWriter::flush`]).
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        let mut body = std::mem::take(&mut self.buf);
        body.clear();
        frame.encode(&mut body)?;
        let sent = self.send_parts(body.len(), &body, &[]).await;
        self.buf = body;
        sent
    }

    /// Writes a frame body from [`encode_body`] with its length and MAC (buffered;
    /// call [`FrameWriter::flush`]).
    pub async fn send_encoded(&mut self, body: &Encoded) -> Result<(), ProtoError> {
        self.send_parts(body.len(), &body.head, &body.tail).await
    }

    /// Writes a body of `len` bytes, `head` then `tail`, with its length and MAC.
    async fn send_parts(
        &mut self,
        len: usize,
        head: &[u8],
        tail: &[Bytes],
    ) -> Result<(), ProtoError> {
        if len > MAX_FRAME_BYTES {
            return Err(ProtoError::TooLarge(len));
        }
        let prefix = u32::try_from(len).map_err(|_| ProtoError::TooLarge(len))?;
        self.inner.write_all(&prefix.to_le_bytes()).await?;
        self.inner.write_all(head).await?;
        for part in tail {
            self.inner.write_all(part).await?;
        }
        let mut sent = LEN_BYTES + len;
        if let Some(mac) = &mut self.mac {
            // the covered part of a batch is within its head; any other frame is all head
            let (tag, _) = mac.next_tag_of(len, codec::authenticated(head));
            self.inner.write_all(&tag).await?;
            sent += tag.len();
        }
        self.bytes += sent as u64;
        Ok(())
    }

    /// Sends buffered frames.
    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        self.inner.flush().await?;
        Ok(())
    }

    /// The stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// Reads frames from a stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    mac: Option<FrameMac>,
    /// Where a long frame's buffer comes from, and goes back to once its writes are gone.
    pub(super) pool: BufPool,
    /// The largest body accepted: handshake-sized until [`FrameReader::authenticated`].
    limit: usize,
    /// Bytes read, for statistics.
    pub bytes: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader without MAC (until [`FrameReader::set_mac`]) that accepts only frames of up to
    /// [`MAX_HANDSHAKE_FRAME_BYTES`] (until [`FrameReader::authenticated`]).
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            mac: None,
            pool: BufPool::new(FRAME_BUFFERS_KEPT, KEPT_FRAME_BUFFER_BYTES),
            limit: MAX_HANDSHAKE_FRAME_BYTES,
            bytes: 0,
        }
    }

    /// The peer proved who it is: from now on frames of up to [`MAX_FRAME_BYTES`] are read.
    pub fn authenticated(&mut self) {
        self.limit = MAX_FRAME_BYTES;
    }

    /// From now on, every frame must carry a valid MAC.
    pub fn set_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    /// Reads one frame. A frame whose MAC fails is consumed whole (the stream stays in step)
    /// and reported as [`ProtoError::BadMac`].
    pub async fn recv(&mut self) -> Result<Frame, ProtoError> {
        let mut prefix = [0u8; LEN_BYTES];
        match self.inner.read_exact(&mut prefix).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
            Err(e) => return Err(e.into()),
        }
        // a length beyond the address space is beyond the limit too
        let len = usize::try_from(u32::from_le_bytes(prefix)).unwrap_or(usize::MAX);
        if len > self.limit {
            return Err(if self.limit < MAX_FRAME_BYTES {
                ProtoError::TooLargeBeforeAuth(len)
            } else {
                ProtoError::TooLarge(len)
            });
        }
        let total = len + if self.mac.is_some() { MAC_BYTES } else { 0 };
        // a long frame (page data) gets a buffer of its own, which its writes then share;
        // page-aligned within its block, as the kernel copies fastest (see `ReadBuf`), read
        // into its spare capacity (nothing is zeroed first), and from the pool: it comes back
        // once the writes are applied
        if len > OWN_BUFFER_FRAME_BYTES {
            let mut block = self.pool.take_block(total);
            let at = to_page_boundary(block.as_ptr());
            block.resize(at, 0);
            let read = read_appending(&mut self.inner, &mut block, total).await;
            self.check(read, &mut block[at..], len)?;
            return Frame::decode_shared(&self.pool.share_block(block, at..at + len));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(total, 0);
        let read = self.inner.read_exact(&mut buf).await;
        let frame = self
            .check(read, &mut buf, len)
            .and_then(|()| Frame::decode(&buf[..len]));
        self.buf = buf;
        frame
    }

    /// After the read of a body of `len` bytes (and its MAC) into `buf`: counts it and checks
    /// its MAC.
    fn check(
        &mut self,
        read: io::Result<usize>,
        buf: &mut [u8],
        len: usize,
    ) -> Result<(), ProtoError> {
        read.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtoError::Closed
            } else {
                e.into()
            }
        })?;
        self.bytes += (LEN_BYTES + buf.len()) as u64;
        if let Some(mac) = &mut self.mac {
            let (want, seq) = mac.next_tag(&buf[..len]);
            if !mac_eq(&want, &buf[len..]) {
                return Err(ProtoError::BadMac { seq });
            }
        }
        Ok(())
    }
}

/// Appends exactly `n` bytes from `r` to `block`, within its capacity if it has room.
async fn read_appending<R: AsyncRead + Unpin>(
    r: &mut R,
    block: &mut Vec<u8>,
    n: usize,
) -> io::Result<usize> {
    let end = block.len() + n;
    while block.len() < end {
        let want = end - block.len();
        if r.read_buf(&mut (&mut *block).limit(want)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(n)
}

/// A [`FrameReader`] running in its own task, its frames (and errors) queued in `frames`:
/// reads are not cancel-safe, so a connection's `select!` waits on the queue instead. The task
/// stops after an error that ends the stream, or when this is dropped.
#[derive(Debug)]
pub(crate) struct ReadTask {
    /// Frames in the order they arrived.
    pub(crate) frames: mpsc::Receiver<Result<Frame, ProtoError>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadTask {
    /// Starts reading: `queue` frames may wait; `seen` hears of each frame (or error) as it
    /// is read, before it is queued, with the reader's byte count, and may turn it into an
    /// error (what it refuses, the consumer refuses too); `ends_stream` says which errors
    /// stop the task (the others are queued and reading goes on).
    pub(crate) fn spawn<R>(
        mut reader: FrameReader<R>,
        queue: usize,
        mut seen: impl FnMut(&mut Result<Frame, ProtoError>, u64) + Send + 'static,
        ends_stream: fn(&ProtoError) -> bool,
    ) -> ReadTask
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (tx, frames) = mpsc::channel(queue);
        let task = tokio::spawn(async move {
            loop {
                let mut f = reader.recv().await;
                seen(&mut f, reader.bytes);
                let end = matches!(&f, Err(e) if ends_stream(e));
                if tx.send(f).await.is_err() || end {
                    return;
                }
            }
        });
        ReadTask { frames, task }
    }
}

impl Drop for ReadTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}
