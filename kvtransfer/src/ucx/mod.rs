//! A safe wrapper over UCX (`ucx-sys`): the library, loaded at run time; one
//! worker per process, owned and progressed by its own thread; endpoints,
//! memory registration, remote keys, put, active messages and flush.
//!
//! Every call from another thread is a command sent to the worker thread,
//! which is the only one that touches UCX objects (the worker runs in
//! `UCS_THREAD_MODE_SINGLE`). Operations return a [`Pending`] that resolves
//! when UCX completes them: await it from tokio or [`Pending::wait`] from a
//! plain thread. Incoming active messages go to a handler the owner installs;
//! it runs on the worker thread and says where the payload goes.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ucx_sys as sys;

mod worker;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UcxError {
    #[error("the UCX library ({path}) could not be loaded: {why}")]
    Load { path: String, why: String },
    #[error("UCX {op} failed: {status}")]
    Status { op: &'static str, status: String },
    #[error("the UCX worker thread has stopped")]
    WorkerGone,
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, UcxError>;

/// The loaded `libucp`.
pub struct Ucx {
    lib: sys::UcpLib,
    /// Where it was loaded from.
    pub path: String,
}

/// The library name tried when no path is given.
pub const DEFAULT_LIB: &str = "libucp.so.0";

impl Ucx {
    /// Opens `path`, else `$TANDEM_UCX_LIB`, else `libucp.so.0` from the
    /// system's library path.
    pub fn load(path: Option<&str>) -> Result<Arc<Ucx>> {
        let path = path
            .map(str::to_string)
            .or_else(|| std::env::var("TANDEM_UCX_LIB").ok())
            .unwrap_or_else(|| DEFAULT_LIB.to_string());
        // SAFETY: opening libucp runs its constructors, which only set up
        // UCX's own global state; every symbol the bindings name is resolved
        // now (`--dynamic-link-require-all`), so a call never finds one missing.
        let lib = unsafe { sys::UcpLib::new(&path) }.map_err(|e| UcxError::Load {
            path: path.clone(),
            why: e.to_string(),
        })?;
        Ok(Arc::new(Ucx { lib, path }))
    }

    /// UCX's version string, e.g. "1.13.1".
    pub fn version(&self) -> String {
        // SAFETY: returns a pointer to a static NUL-terminated string.
        unsafe { CStr::from_ptr(self.lib.ucp_get_version_string()) }
            .to_string_lossy()
            .into_owned()
    }

    fn status(&self, s: sys::ucs_status_t) -> String {
        // SAFETY: returns a pointer to a static NUL-terminated string for any status.
        unsafe { CStr::from_ptr(self.lib.ucs_status_string(s)) }
            .to_string_lossy()
            .into_owned()
    }

    fn check(&self, op: &'static str, s: sys::ucs_status_t) -> Result<()> {
        if s == sys::ucs_status_t_UCS_OK {
            Ok(())
        } else {
            Err(UcxError::Status {
                op,
                status: self.status(s),
            })
        }
    }
}

/// How a worker's context is configured beyond UCX's own environment
/// variables (`UCX_TLS`, `UCX_NET_DEVICES`, … are read as usual; these
/// override them when set).
#[derive(Debug, Clone, Default)]
pub struct WorkerOptions {
    /// Transports, as `UCX_TLS` takes them: "tcp", "sm", "rc,sm", …
    pub tls: Option<String>,
    /// Devices, as `UCX_NET_DEVICES` takes them: "mlx5_0:1", "lo", …
    pub net_devices: Option<String>,
    /// Connect with UCX's peer-failure handling where the transports support
    /// it (TCP, RDMA): UCX then fails the operations outstanding to a peer
    /// that died. Off by default, by measurement (`tandem bench kv`): with it
    /// on, UCX uses zero-copy rendezvous only through memory domains that can
    /// revoke a peer's access, which TCP's cannot, so payloads stream as
    /// 64 KiB fragments the receiver copies a second time (0.6-0.75x of the
    /// rate without). Tandem's nodes notice a lost peer on the QUIC link
    /// beside every endpoint and bound every wait instead.
    pub peer_failure: bool,
}

/// An endpoint to a remote worker, by id on the worker thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EpId(u64);

/// A remote key unpacked for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RkeyId(u64);

/// Local memory registered with the worker's context.
#[derive(Debug, Clone)]
pub struct Region {
    id: u64,
    /// The registered range's address, as the remote side must name it.
    pub base: u64,
    pub len: usize,
    /// The packed remote key a peer unpacks to write here.
    pub rkey: Vec<u8>,
}

/// Free bytes in `/dev/shm`, where UCX's shared-memory transports allocate
/// segments; `None` where there is no such file system.
pub fn shm_free_bytes() -> Option<u64> {
    let path = CString::new("/dev/shm").ok()?;
    // SAFETY: statvfs only writes the zeroed struct it is given.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes kept alive until the operation that reads them completes.
pub type Bytes = Arc<Vec<u8>>;

/// Where an incoming active message's payload goes, decided by the handler.
pub enum Placement {
    /// Not wanted (a stale or unknown transfer): the payload is discarded.
    Drop,
    /// Write the payload, in order, over these (address, length) runs; they
    /// must add up to its length. `done` runs on the worker thread once it
    /// is all there (or failed).
    Into {
        runs: Vec<(usize, usize)>,
        done: Box<dyn FnOnce(Result<()>) + Send>,
    },
}

/// Decides where a message goes, from its header and payload length. Runs on
/// the worker thread, inside progress: it must not block.
pub type AmHandler = Box<dyn FnMut(&[u8], usize) -> Placement + Send>;

/// Where one operation's result lands: a thread blocks on it (a condition
/// variable, woken the moment the worker thread completes the operation)
/// or a task awaits it (its waker).
struct Slot {
    state: std::sync::Mutex<(Option<Result<()>>, Option<std::task::Waker>)>,
    cv: std::sync::Condvar,
}

/// The worker thread's end of a [`Pending`]: sends the result once;
/// dropped unsent (the worker stopped), it sends [`UcxError::WorkerGone`].
pub(crate) struct Completer(Option<Arc<Slot>>);

impl Completer {
    pub(crate) fn send(mut self, r: Result<()>) -> std::result::Result<(), ()> {
        self.fire(r);
        Ok(())
    }

    fn fire(&mut self, r: Result<()>) {
        let Some(slot) = self.0.take() else { return };
        let mut g = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = Some(r);
        let waker = g.1.take();
        drop(g);
        slot.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.fire(Err(UcxError::WorkerGone));
    }
}

/// A completion and the [`Pending`] that waits for it.
pub(crate) fn completion() -> (Completer, Pending) {
    let slot = Arc::new(Slot {
        state: std::sync::Mutex::new((None, None)),
        cv: std::sync::Condvar::new(),
    });
    (Completer(Some(slot.clone())), Pending(slot))
}

/// Completion of one operation.
pub struct Pending(Arc<Slot>);

impl Pending {
    /// Blocks this (non-tokio) thread until the operation completes.
    pub fn wait(mut self) -> Result<()> {
        loop {
            if let Some(r) = self.poll_for(Duration::from_secs(3600)) {
                return r;
            }
        }
    }

    /// [`Pending::wait`], giving up after `timeout` (a peer that died
    /// without UCX noticing never completes an operation).
    pub fn wait_for(mut self, timeout: Duration) -> Result<()> {
        self.poll_for(timeout).unwrap_or_else(|| {
            Err(UcxError::Invalid(format!(
                "no completion within {timeout:?}"
            )))
        })
    }

    /// Waits up to `timeout` for the operation: `None` if it has not
    /// completed by then (it stays pending, to be waited for again).
    pub fn poll_for(&mut self, timeout: Duration) -> Option<Result<()>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.0.take() {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .0
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Awaits the operation.
    pub async fn done(self) -> Result<()> {
        std::future::poll_fn(|cx| {
            let mut g = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            match g.0.take() {
                Some(r) => std::task::Poll::Ready(r),
                None => {
                    g.1 = Some(cx.waker().clone());
                    std::task::Poll::Pending
                }
            }
        })
        .await
    }

    fn ready(r: Result<()>) -> Pending {
        let (tx, rx) = completion();
        let _ = tx.send(r);
        rx
    }
}

type Reply<T> = mpsc::SyncSender<Result<T>>;

enum Cmd {
    Connect(Vec<u8>, Reply<EpId>),
    Close(EpId),
    /// Register `len` bytes at the address (0: allocate them).
    Map(usize, usize, Reply<Region>),
    Unmap(u64),
    Unpack(EpId, Vec<u8>, Reply<RkeyId>),
    /// Destroy an unpacked remote key (and release what it maps).
    Release(RkeyId),
    /// How many unpacked remote keys the worker holds.
    #[cfg(test)]
    Rkeys(Reply<usize>),
    /// Writes of parts of one buffer: (start, end, remote address).
    Put {
        ep: EpId,
        data: Bytes,
        parts: Vec<(usize, usize, u64)>,
        rkey: RkeyId,
        done: Completer,
    },
    /// One message whose payload is the parts, in order: (buffer, start, end).
    AmSend {
        ep: EpId,
        id: u16,
        header: Vec<u8>,
        parts: Vec<(Bytes, usize, usize)>,
        rndv: bool,
        done: Completer,
    },
    Flush(EpId, Completer),
    Handler(u16, AmHandler, Reply<()>),
    EpFailed(EpId, Reply<bool>),
    Mapped(RkeyId, u64, Reply<usize>),
}

/// A UCX worker and the thread that progresses it. Dropping it stops the
/// thread, closes the endpoints and releases the registrations.
pub struct Worker {
    tx: mpsc::Sender<Cmd>,
    address: Vec<u8>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    ucx: Arc<Ucx>,
}

impl Worker {
    /// Creates a context (RMA and active messages) and a worker on a new
    /// thread named `name`.
    pub fn start(ucx: Arc<Ucx>, opts: &WorkerOptions, name: &str) -> Result<Worker> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (ucx, opts, stop) = (ucx.clone(), opts.clone(), stop.clone());
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || match worker::State::new(ucx, &opts) {
                    Ok(mut st) => match st.address() {
                        Ok(a) => {
                            let _ = ready_tx.send(Ok(a));
                            st.run(rx, &stop);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            st.run(rx, &AtomicBool::new(true));
                        }
                    },
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })
                .map_err(|e| UcxError::Invalid(format!("cannot start the UCX thread: {e}")))?
        };
        let address = ready_rx.recv().map_err(|_| UcxError::WorkerGone)??;
        Ok(Worker {
            tx,
            address,
            stop,
            thread: Some(thread),
            ucx,
        })
    }

    pub fn ucx(&self) -> &Arc<Ucx> {
        &self.ucx
    }

    /// The worker's address, for peers to connect to.
    pub fn address(&self) -> &[u8] {
        &self.address
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx.send(make(tx)).map_err(|_| UcxError::WorkerGone)?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| UcxError::WorkerGone)?
    }

    /// An endpoint to the worker at `address` (as [`Worker::address`] gave it).
    pub fn connect(&self, address: &[u8]) -> Result<EpId> {
        self.call(|r| Cmd::Connect(address.to_vec(), r))
    }

    /// Closes an endpoint; operations still on it fail.
    pub fn close(&self, ep: EpId) {
        let _ = self.tx.send(Cmd::Close(ep));
    }

    /// Whether UCX reported the endpoint failed (its peer is gone).
    pub fn failed(&self, ep: EpId) -> bool {
        self.call(|r| Cmd::EpFailed(ep, r)).unwrap_or(true)
    }

    /// Registers `len` bytes at `ptr` so peers holding the returned remote
    /// key can write there, and so transfers into them need no bounce buffer.
    ///
    /// # Safety
    /// The memory must stay allocated until [`Worker::unmap`] or the worker
    /// is dropped, and the caller must accept that peers write into it at
    /// any time while it is registered.
    pub unsafe fn map(&self, ptr: *mut u8, len: usize) -> Result<Region> {
        self.call(|r| Cmd::Map(ptr as usize, len, r))
    }

    /// Allocates `len` bytes through UCX and registers them. Memory UCX
    /// allocates can live in a shared segment, which peers on the same host
    /// map and write with a plain copy instead of a system call per write
    /// (measured by `tandem bench kv`); it is zeroed, and freed by
    /// [`Worker::unmap`] or when the worker is dropped.
    pub fn alloc(&self, len: usize) -> Result<Region> {
        if len == 0 {
            return Err(UcxError::Invalid("cannot allocate 0 bytes".into()));
        }
        self.call(|r| Cmd::Map(0, len, r))
    }

    pub fn unmap(&self, region: &Region) {
        let _ = self.tx.send(Cmd::Unmap(region.id));
    }

    /// Where the peer's memory at `remote` under `rkey` is mapped into this
    /// process (`ucp_rkey_ptr`), if it is: when both sides share a host and
    /// UCX allocated that memory in a shared segment. This process can then
    /// write it with plain stores; elsewhere UCX may emulate puts (over TCP
    /// about 4x slower than active messages, by `tandem bench kv`).
    pub fn local_address(&self, rkey: RkeyId, remote: u64) -> Option<usize> {
        match self.call(|r| Cmd::Mapped(rkey, remote, r)) {
            Ok(0) | Err(_) => None,
            Ok(a) => Some(a),
        }
    }

    /// Unpacks a peer's remote key for use on `ep`.
    pub fn unpack(&self, ep: EpId, rkey: &[u8]) -> Result<RkeyId> {
        self.call(|r| Cmd::Unpack(ep, rkey.to_vec(), r))
    }

    /// Destroys an unpacked remote key: operations and addresses
    /// ([`Worker::local_address`]) under it are no longer valid. Keys still
    /// held are destroyed when the worker stops.
    pub fn release(&self, rkey: RkeyId) {
        let _ = self.tx.send(Cmd::Release(rkey));
    }

    #[cfg(test)]
    pub(crate) fn rkeys(&self) -> usize {
        self.call(Cmd::Rkeys).unwrap_or(usize::MAX)
    }

    /// Writes `data[range]` to `remote` in the peer's memory under `rkey`.
    /// Completion means the local buffer may be reused, not that the bytes
    /// are visible remotely: [`Worker::flush`] says that.
    pub fn put(
        &self,
        ep: EpId,
        data: Bytes,
        range: std::ops::Range<usize>,
        remote: u64,
        rkey: RkeyId,
    ) -> Pending {
        self.put_many(ep, data, vec![(range, remote)], rkey)
    }

    /// Several writes from one buffer, issued together: one command to the
    /// worker thread and one completion for all of them.
    pub fn put_many(
        &self,
        ep: EpId,
        data: Bytes,
        parts: Vec<(std::ops::Range<usize>, u64)>,
        rkey: RkeyId,
    ) -> Pending {
        if parts
            .iter()
            .any(|(r, _)| r.end > data.len() || r.start > r.end)
        {
            return Pending::ready(Err(UcxError::Invalid(
                "put range outside the buffer".into(),
            )));
        }
        let (done, rx) = completion();
        let cmd = Cmd::Put {
            ep,
            data,
            parts: parts
                .into_iter()
                .map(|(r, a)| (r.start, r.end, a))
                .collect(),
            rkey,
            done,
        };
        self.send(cmd, rx)
    }

    /// Sends an active message: `header` (small) and `data` (the payload).
    /// `rndv` forces the rendezvous protocol, whose completion means the
    /// receiver has the whole payload where its handler placed it.
    pub fn am_send(
        &self,
        ep: EpId,
        id: u16,
        header: Vec<u8>,
        data: Bytes,
        range: std::ops::Range<usize>,
        rndv: bool,
    ) -> Pending {
        self.am_send_parts(ep, id, header, vec![(data, range)], rndv)
    }

    /// Sends one active message whose payload is `parts` one after the
    /// other, gathered by UCX from where they are (no copy into one buffer
    /// first). The receiver sees one payload of their total length.
    pub fn am_send_parts(
        &self,
        ep: EpId,
        id: u16,
        header: Vec<u8>,
        parts: Vec<(Bytes, std::ops::Range<usize>)>,
        rndv: bool,
    ) -> Pending {
        if parts.is_empty() {
            return Pending::ready(Err(UcxError::Invalid("a message with no payload".into())));
        }
        if parts
            .iter()
            .any(|(d, r)| r.end > d.len() || r.start > r.end)
        {
            return Pending::ready(Err(UcxError::Invalid(
                "send range outside the buffer".into(),
            )));
        }
        let (done, rx) = completion();
        let cmd = Cmd::AmSend {
            ep,
            id,
            header,
            parts: parts
                .into_iter()
                .map(|(d, r)| (d, r.start, r.end))
                .collect(),
            rndv,
            done,
        };
        self.send(cmd, rx)
    }

    /// Completes when every operation issued on `ep` so far has completed
    /// remotely.
    pub fn flush(&self, ep: EpId) -> Pending {
        let (done, rx) = completion();
        self.send(Cmd::Flush(ep, done), rx)
    }

    /// Installs the handler for active messages with this id.
    pub fn on_am(&self, id: u16, handler: AmHandler) -> Result<()> {
        self.call(|r| Cmd::Handler(id, handler, r))
    }

    fn send(&self, cmd: Cmd, rx: Pending) -> Pending {
        // If the worker is gone the command drops here, and its completer
        // with it, which completes `rx` with WorkerGone.
        let _ = self.tx.send(cmd);
        rx
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes the payload of an eager message over `runs`.
fn copy_runs(data: &[u8], runs: &[(usize, usize)]) -> Result<()> {
    let total: usize = runs.iter().map(|r| r.1).sum();
    if total != data.len() {
        return Err(UcxError::Invalid(format!(
            "{} payload bytes for runs covering {total}",
            data.len()
        )));
    }
    let mut at = 0;
    for &(ptr, len) in runs {
        // SAFETY: the handler that returned these runs promises each is
        // `len` writable bytes it owns for this transfer; `data` is UCX's
        // receive buffer, which cannot overlap them.
        unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), ptr as *mut u8, len) };
        at += len;
    }
    Ok(())
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| UcxError::Invalid(format!("{s:?} contains a NUL byte")))
}

fn now() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests;
