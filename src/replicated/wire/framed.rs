//! Frames on a byte stream: [`FrameWriter`] encodes, prefixes the length and appends the MAC;
//! [`FrameReader`] checks the length before it allocates, then the MAC, then decodes. A new
//! reader accepts only handshake-sized frames ([`MAX_HANDSHAKE_FRAME_BYTES`]) until the
//! handshake calls [`FrameReader::authenticated`], so a peer that has proved nothing cannot
//! make us allocate more than a few KiB.
//! `ReadTask` runs a reader in its own task so that a connection's `select!` never cancels a
//! read half-way.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::replicated::wire::mac::{mac_eq, FrameMac};
use crate::replicated::wire::{
    Frame, ProtoError, MAC_BYTES, MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES,
};

/// Bytes of the length prefix.
const LEN_BYTES: usize = 4;

/// A frame's body, encoded to be sent (and sent again) with
/// [`FrameWriter::send_encoded`]: what a window of unacknowledged frames holds, as small
/// as it is on the wire (a batch of metadata ops takes several times more decoded).
pub fn encode_body(frame: &Frame) -> Result<Vec<u8>, ProtoError> {
    encode_body_sized(frame, 0)
}

/// [`encode_body`] into a buffer of `capacity` bytes to begin with: a batch of page data,
/// encoded into a buffer that grows as it goes, is copied once per doubling and lands on
/// freshly faulted pages each time.
pub fn encode_body_sized(frame: &Frame, capacity: usize) -> Result<Vec<u8>, ProtoError> {
    let mut body = Vec::with_capacity(capacity.min(MAX_FRAME_BYTES));
    frame.encode(&mut body)?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(ProtoError::TooLarge(body.len()));
    }
    body.shrink_to_fit();
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
        let sent = self.send_encoded(&body).await;
        self.buf = body;
        sent
    }

    /// Writes a frame body from [`encode_body`] with its length and MAC (buffered;
    /// call [`FrameWriter::flush`]).
    pub async fn send_encoded(&mut self, body: &[u8]) -> Result<(), ProtoError> {
        if body.len() > MAX_FRAME_BYTES {
            return Err(ProtoError::TooLarge(body.len()));
        }
        let prefix = u32::try_from(body.len()).map_err(|_| ProtoError::TooLarge(body.len()))?;
        self.inner.write_all(&prefix.to_le_bytes()).await?;
        self.inner.write_all(body).await?;
        let mut sent = LEN_BYTES + body.len();
        if let Some(mac) = &mut self.mac {
            let (tag, _) = mac.next_tag(body);
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
        self.buf.resize(total, 0);
        self.inner.read_exact(&mut self.buf).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtoError::Closed
            } else {
                e.into()
            }
        })?;
        self.bytes += (LEN_BYTES + total) as u64;
        if let Some(mac) = &mut self.mac {
            let (want, seq) = mac.next_tag(&self.buf[..len]);
            if !mac_eq(&want, &self.buf[len..]) {
                return Err(ProtoError::BadMac { seq });
            }
        }
        Frame::decode(&self.buf[..len])
    }
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
    /// Starts reading: `queue` frames may wait; `counted` hears the reader's byte count after
    /// each read; `ends_stream` says which errors stop the task (the others are queued and
    /// reading goes on).
    pub(crate) fn spawn<R>(
        mut reader: FrameReader<R>,
        queue: usize,
        mut counted: impl FnMut(u64) + Send + 'static,
        ends_stream: fn(&ProtoError) -> bool,
    ) -> ReadTask
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (tx, frames) = mpsc::channel(queue);
        let task = tokio::spawn(async move {
            loop {
                let f = reader.recv().await;
                counted(reader.bytes);
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
