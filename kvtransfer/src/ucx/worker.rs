//! The worker thread: owns the UCX context and worker, runs commands, and
//! progresses the worker, spinning while there is activity and polling
//! every millisecond when quiet (so incoming messages are served without a
//! core spent waiting).

use super::*;

/// An operation UCX has not completed yet.
struct Op {
    req: *mut c_void,
    /// Buffers the operation reads or writes: kept alive until it completes
    /// (and released before its completion fires, so a waiter that holds
    /// them too then holds the last reference).
    keep: Vec<Bytes>,
    _iov: Option<Vec<sys::ucp_dt_iov_t>>,
    done: Done,
}

enum Done {
    Tx(super::Completer),
    Call(Box<dyn FnOnce(Result<()>) + Send>),
}

impl Done {
    fn fire(self, r: Result<()>) {
        match self {
            Done::Tx(tx) => {
                let _ = tx.send(r);
            }
            Done::Call(f) => f(r),
        }
    }
}

/// What the active-message callback reaches through its `arg`.
struct AmSlot {
    state: *mut State,
    id: u16,
}

pub(super) struct State {
    ucx: Arc<Ucx>,
    ctx: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    eps: HashMap<u64, sys::ucp_ep_h>,
    /// Endpoints UCX reported failed, by the pointer its callback gets.
    failed: Vec<u64>,
    rkeys: HashMap<u64, sys::ucp_rkey_h>,
    mems: HashMap<u64, sys::ucp_mem_h>,
    handlers: HashMap<u16, AmHandler>,
    // Boxed: UCX callbacks hold pointers to slots, which must not move
    // when the list grows.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<AmSlot>>,
    ops: Vec<Op>,
    next: u64,
    /// Only shared-memory transports are allowed: they cannot report a
    /// lost peer, so endpoints are made without peer-failure handling.
    shm_only: bool,
    /// Endpoints are made with peer-failure handling (unless `shm_only`).
    peer_failure: bool,
}

/// Whether a `UCX_TLS` value names only same-host transports.
fn shm_only(tls: &str) -> bool {
    let shm = ["sm", "shm", "posix", "sysv", "cma", "knem", "xpmem", "self"];
    !tls.trim().is_empty()
        && !tls.starts_with('^')
        && tls.split(',').all(|t| shm.contains(&t.trim()))
}

/// UCX reports a failed endpoint (its peer is gone): marks it failed, so
/// operations on it return an error instead of waiting.
unsafe extern "C" fn on_ep_error(arg: *mut c_void, ep: sys::ucp_ep_h, _status: sys::ucs_status_t) {
    // SAFETY: `arg` is the `State` that created the endpoint (set in
    // `connect`); UCX calls this only from progress, on the worker thread,
    // while that `State` is alive and not otherwise borrowed across progress.
    let st = unsafe { &mut *(arg as *mut State) };
    // UCX passes its own handle, not our id: find the id by handle.
    let failed: Vec<u64> = st
        .eps
        .iter()
        .filter(|(_, &e)| e == ep)
        .map(|(&id, _)| id)
        .collect();
    st.failed.extend(failed);
}

unsafe extern "C" fn on_am(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: `arg` is a boxed `AmSlot` kept in `State::slots` for the
    // worker's life; the callback runs during progress on the worker thread.
    let slot = unsafe { &*(arg as *const AmSlot) };
    // SAFETY: as above, the state outlives the worker and progress holds no
    // other reference to it while callbacks run.
    let st = unsafe { &mut *slot.state };
    // SAFETY: UCX passes `header_length` readable bytes at `header` (or none).
    let header = if header_length == 0 {
        &[][..]
    } else {
        unsafe { std::slice::from_raw_parts(header as *const u8, header_length) }
    };
    // SAFETY: `param` points to a valid struct for the callback's duration.
    let rndv = unsafe { (*param).recv_attr }
        & sys::ucp_am_recv_attr_t_UCP_AM_RECV_ATTR_FLAG_RNDV as u64
        != 0;
    let placement = match st.handlers.get_mut(&slot.id) {
        Some(h) => h(header, length),
        None => Placement::Drop,
    };
    // A dropped message costs nothing here: an eager one is discarded with
    // the callback's return, and a rendezvous one left unreceived (UCS_OK
    // without `ucp_am_recv_data_nbx`) is acknowledged to its sender without
    // its payload ever moving. Nothing is allocated for a length a peer
    // chose.
    match placement {
        Placement::Drop => {}
        Placement::Into { runs, done } => {
            let covered = runs.iter().try_fold(0usize, |a, r| a.checked_add(r.1));
            if covered != Some(length) {
                done(Err(UcxError::Invalid(format!(
                    "{length} payload bytes for runs covering {covered:?}"
                ))));
            } else if !rndv {
                // SAFETY: for an eager message UCX passes `length` readable
                // bytes at `data`, valid until this callback returns.
                let bytes = unsafe { std::slice::from_raw_parts(data as *const u8, length) };
                done(copy_runs(bytes, &runs));
            } else {
                st.receive(data, runs, done);
            }
        }
    }
    sys::ucs_status_t_UCS_OK
}

impl State {
    pub(super) fn new(ucx: Arc<Ucx>, opts: &WorkerOptions) -> Result<Box<State>> {
        let lib = &ucx.lib;
        let mut config: *mut sys::ucp_config_t = std::ptr::null_mut();
        // SAFETY: NULL prefix and file name read UCX_* from the environment;
        // `config` is released below on every path.
        ucx.check("config_read", unsafe {
            lib.ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config)
        })?;
        let modify = |k: &str, v: &Option<String>| -> Result<()> {
            if let Some(v) = v {
                let (k, v) = (cstring(k)?, cstring(v)?);
                // SAFETY: `config` is live; the strings are NUL-terminated.
                ucx.check("config_modify", unsafe {
                    lib.ucp_config_modify(config, k.as_ptr(), v.as_ptr())
                })?;
            }
            Ok(())
        };
        let modified =
            modify("TLS", &opts.tls).and_then(|_| modify("NET_DEVICES", &opts.net_devices));
        // SAFETY: zeroed is a valid `ucp_params_t` (plain data, null pointers);
        // only the fields named in `field_mask` are read.
        let mut params: sys::ucp_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = sys::ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64;
        params.features =
            (sys::ucp_feature_UCP_FEATURE_RMA | sys::ucp_feature_UCP_FEATURE_AM) as u64;
        let mut ctx: sys::ucp_context_h = std::ptr::null_mut();
        let init = modified.and_then(|_| {
            // SAFETY: params and config are valid; `ctx` receives the context.
            ucx.check("init", unsafe {
                lib.ucp_init_version(
                    sys::UCP_API_MAJOR,
                    sys::UCP_API_MINOR,
                    &params,
                    config,
                    &mut ctx,
                )
            })
        });
        // SAFETY: the config was read above and is not used after this.
        unsafe { lib.ucp_config_release(config) };
        init?;
        // SAFETY: as for `params`.
        let mut wp: sys::ucp_worker_params_t = unsafe { std::mem::zeroed() };
        wp.field_mask = sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
        wp.thread_mode = sys::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE;
        let mut worker: sys::ucp_worker_h = std::ptr::null_mut();
        // SAFETY: `ctx` is live; the worker is used only by this thread.
        if let Err(e) = ucx.check("worker_create", unsafe {
            lib.ucp_worker_create(ctx, &wp, &mut worker)
        }) {
            // SAFETY: nothing else holds the context.
            unsafe { lib.ucp_cleanup(ctx) };
            return Err(e);
        }
        Ok(Box::new(State {
            ucx: ucx.clone(),
            ctx,
            worker,
            eps: HashMap::new(),
            failed: Vec::new(),
            rkeys: HashMap::new(),
            mems: HashMap::new(),
            handlers: HashMap::new(),
            slots: Vec::new(),
            ops: Vec::new(),
            next: 1,
            peer_failure: opts.peer_failure,
            shm_only: shm_only(
                &opts
                    .tls
                    .clone()
                    .or_else(|| std::env::var("UCX_TLS").ok())
                    .unwrap_or_default(),
            ),
        }))
    }

    pub(super) fn address(&mut self) -> Result<Vec<u8>> {
        let mut addr: *mut sys::ucp_address_t = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: the worker is live; UCX allocates the address, copied and
        // released right after.
        self.ucx.check("worker_get_address", unsafe {
            self.ucx
                .lib
                .ucp_worker_get_address(self.worker, &mut addr, &mut len)
        })?;
        // SAFETY: UCX returned `len` bytes at `addr`.
        let v = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        // SAFETY: `addr` came from `ucp_worker_get_address` on this worker.
        unsafe { self.ucx.lib.ucp_worker_release_address(self.worker, addr) };
        Ok(v)
    }

    fn id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    pub(super) fn run(mut self: Box<Self>, rx: mpsc::Receiver<Cmd>, stop: &AtomicBool) {
        let mut idle_since = now();
        let mut reaped = now();
        while !stop.load(Ordering::Acquire) {
            let mut busy = false;
            loop {
                match rx.try_recv() {
                    Ok(c) => {
                        self.exec(c);
                        busy = true;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return self.shutdown(),
                }
            }
            // SAFETY: the worker is live and used only by this thread.
            while unsafe { self.ucx.lib.ucp_worker_progress(self.worker) } != 0 {
                busy = true;
            }
            // Operations complete during progress (or a command), so a quiet
            // pass skips checking each one, except every 20 µs in case UCX
            // completed one without counting an event: with hundreds of
            // blocks in flight the checks were ~4% of a transfer's CPU.
            if busy || reaped.elapsed() >= Duration::from_micros(20) {
                busy |= self.reap();
                reaped = now();
            }
            if busy {
                idle_since = now();
                continue;
            }
            // Quiet: keep spinning (yielding) for a while after the last
            // activity, since transfers come in bursts: 200 µs, or 50 ms
            // while operations are in flight. Then wait for a command,
            // progressing every millisecond, so a quiet worker costs next to
            // no CPU on nodes whose cores compute, even when an operation
            // waits on a peer that died (endpoints have no peer-failure
            // handling; it completes when its endpoint is closed).
            let spin = if self.ops.is_empty() {
                Duration::from_micros(200)
            } else {
                Duration::from_millis(50)
            };
            if idle_since.elapsed() < spin {
                std::thread::yield_now();
                continue;
            }
            match rx.recv_timeout(Duration::from_millis(1)) {
                Ok(c) => {
                    self.exec(c);
                    idle_since = now();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.shutdown()
    }

    /// Completes finished operations; true when any did.
    fn reap(&mut self) -> bool {
        let mut any = false;
        let mut i = 0;
        while i < self.ops.len() {
            // SAFETY: `req` is a request UCX returned and we have not freed.
            let s = unsafe { self.ucx.lib.ucp_request_check_status(self.ops[i].req) };
            if s == sys::ucs_status_t_UCS_INPROGRESS {
                i += 1;
                continue;
            }
            let op = self.ops.swap_remove(i);
            // SAFETY: completed, so UCX no longer uses it; freed once.
            unsafe { self.ucx.lib.ucp_request_free(op.req) };
            drop(op.keep);
            op.done.fire(self.ucx.check("request", s));
            any = true;
        }
        any
    }

    /// Tracks what a non-blocking call returned: done now, failed, or pending.
    fn track(
        &mut self,
        op: &'static str,
        ret: sys::ucs_status_ptr_t,
        keep: Vec<Bytes>,
        iov: Option<Vec<sys::ucp_dt_iov_t>>,
        done: Done,
    ) {
        let p = ret as *const c_void;
        if sys::ptr_is_ptr(p) {
            self.ops.push(Op {
                req: ret,
                keep,
                _iov: iov,
                done,
            });
        } else {
            drop(keep);
            done.fire(self.ucx.check(op, sys::ptr_status(p)));
        }
    }

    fn receive(
        &mut self,
        data: *mut c_void,
        runs: Vec<(usize, usize)>,
        done: Box<dyn FnOnce(Result<()>) + Send>,
    ) {
        if runs.len() > 1 {
            // UCX 1.13 mishandles a scattered (iov) rendezvous receive over
            // shared memory; several runs land in one buffer, copied out after.
            let mut bounce = vec![0u8; runs.iter().map(|r| r.1).sum()];
            let one = vec![(bounce.as_mut_ptr() as usize, bounce.len())];
            let then =
                Box::new(move |r: Result<()>| done(r.and_then(|_| copy_runs(&bounce, &runs))));
            return self.receive(data, one, then);
        }
        let Some(&(ptr, len)) = runs.first() else {
            return done(Err(UcxError::Invalid("a placement with no runs".into())));
        };
        // The run is named as a contiguous buffer, which lets UCX pick a
        // zero-copy rendezvous (an RDMA read or write straight into it),
        // except on shared memory alone, where it is named as a one-entry
        // iov. UCX has no zero-copy rendezvous for an iov, so the sender
        // streams the payload through the shared-memory FIFO, and that
        // measured faster here than the cross-memory-attach read a
        // contiguous buffer gets (`tandem bench kv`, 90 MiB in 720 KiB
        // messages: 4.5 against 3.3 GB/s).
        let iov = vec![sys::ucp_dt_iov_t {
            buffer: ptr as *mut c_void,
            length: len,
        }];
        // SAFETY: zeroed is a valid param block; only masked fields are read,
        // and with no datatype masked it is contiguous bytes.
        let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        let (buffer, count) = if self.shm_only {
            p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_DATATYPE;
            p.datatype = sys::DATATYPE_IOV;
            (iov.as_ptr() as *mut c_void, iov.len())
        } else {
            (ptr as *mut c_void, len)
        };
        // SAFETY: `data` is the rendezvous descriptor from the callback; the
        // iov array lives in the tracked op until completion, and the run it
        // names is writable memory the handler reserved for this message.
        let ret = unsafe {
            self.ucx
                .lib
                .ucp_am_recv_data_nbx(self.worker, data, buffer, count, &p)
        };
        self.track("am_recv_data", ret, Vec::new(), Some(iov), Done::Call(done));
    }

    fn ep(&self, ep: EpId) -> Result<sys::ucp_ep_h> {
        if self.failed.contains(&ep.0) {
            return Err(UcxError::Invalid(
                "the UCX endpoint failed (peer lost)".into(),
            ));
        }
        self.eps
            .get(&ep.0)
            .copied()
            .ok_or_else(|| UcxError::Invalid("no such UCX endpoint".into()))
    }

    fn exec(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Connect(addr, reply) => {
                let _ = reply.send(self.connect(&addr));
            }
            Cmd::Close(ep) => {
                if let Some(e) = self.eps.remove(&ep.0) {
                    // SAFETY: zeroed params with flags: force close.
                    let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
                    p.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
                    p.flags = sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE;
                    // SAFETY: `e` is a live endpoint, removed from the table so never used again.
                    let ret = unsafe { self.ucx.lib.ucp_ep_close_nbx(e, &p) };
                    self.track(
                        "ep_close",
                        ret,
                        Vec::new(),
                        None,
                        Done::Call(Box::new(|_| {})),
                    );
                }
            }
            Cmd::Map(ptr, len, reply) => {
                let _ = reply.send(self.map(ptr, len));
            }
            Cmd::Unmap(id) => {
                if let Some(m) = self.mems.remove(&id) {
                    // SAFETY: `m` was mapped on this context and is unmapped once.
                    unsafe { self.ucx.lib.ucp_mem_unmap(self.ctx, m) };
                }
            }
            Cmd::Unpack(ep, bytes, reply) => {
                let r = self.ep(ep).and_then(|e| {
                    let mut rkey: sys::ucp_rkey_h = std::ptr::null_mut();
                    // SAFETY: `bytes` is a packed key the peer produced with
                    // `ucp_rkey_pack`; UCX validates it and copies what it needs.
                    self.ucx.check("rkey_unpack", unsafe {
                        self.ucx.lib.ucp_ep_rkey_unpack(
                            e,
                            bytes.as_ptr() as *const c_void,
                            &mut rkey,
                        )
                    })?;
                    let id = self.id();
                    self.rkeys.insert(id, rkey);
                    Ok(RkeyId(id))
                });
                let _ = reply.send(r);
            }
            #[cfg(test)]
            Cmd::Rkeys(reply) => {
                let _ = reply.send(Ok(self.rkeys.len()));
            }
            Cmd::Release(rkey) => {
                if let Some(k) = self.rkeys.remove(&rkey.0) {
                    // SAFETY: unpacked on this worker, removed from the table
                    // so destroyed once; operations under it were waited for
                    // by whoever held it.
                    unsafe { self.ucx.lib.ucp_rkey_destroy(k) };
                }
            }
            Cmd::Put {
                ep,
                data,
                parts,
                rkey,
                done,
            } => {
                let (e, k) = match (self.ep(ep), self.rkeys.get(&rkey.0)) {
                    (Ok(e), Some(&k)) => (e, k),
                    (Err(err), _) => return Done::Tx(done).fire(Err(err)),
                    (_, None) => {
                        return Done::Tx(done)
                            .fire(Err(UcxError::Invalid("no such remote key".into())))
                    }
                };
                // One completion for every part: the last to finish fires it.
                let all = Arc::new(std::sync::Mutex::new(Some((done, parts.len(), Ok(())))));
                for (start, end, remote) in parts {
                    // SAFETY: zeroed params: contiguous bytes, no callback.
                    let p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
                    // SAFETY: `data` stays alive in the tracked op until UCX
                    // is done reading it; the range was checked against its length.
                    let ret = unsafe {
                        self.ucx.lib.ucp_put_nbx(
                            e,
                            data.as_ptr().add(start) as *const c_void,
                            end - start,
                            remote,
                            k,
                            &p,
                        )
                    };
                    let all = all.clone();
                    let part_done = Done::Call(Box::new(move |r: Result<()>| {
                        let mut g = all.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some((_, left, first)) = g.as_mut() {
                            *left -= 1;
                            if first.is_ok() {
                                *first = r;
                            }
                            if *left == 0 {
                                let (tx, _, r) = g.take().expect("present");
                                let _ = tx.send(r);
                            }
                        }
                    }));
                    self.track("put", ret, vec![data.clone()], None, part_done);
                }
                let mut g = all.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(g.as_ref(), Some((_, 0, _))) {
                    let (tx, _, r) = g.take().expect("present");
                    let _ = tx.send(r);
                }
            }
            Cmd::AmSend {
                ep,
                id,
                header,
                parts,
                rndv,
                done,
            } => {
                let e = match self.ep(ep) {
                    Ok(e) => e,
                    Err(err) => return Done::Tx(done).fire(Err(err)),
                };
                // SAFETY: zeroed params, then masked fields only.
                let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
                if rndv {
                    p.op_attr_mask |= sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
                    p.flags = sys::ucp_send_am_flags_UCP_AM_SEND_FLAG_RNDV;
                }
                // One part goes as a contiguous buffer; several as an iov,
                // which UCX gathers on this side.
                let iov: Option<Vec<sys::ucp_dt_iov_t>> = (parts.len() > 1).then(|| {
                    parts
                        .iter()
                        .map(|(d, s, e)| sys::ucp_dt_iov_t {
                            // SAFETY: `s <= e <= d.len()`, checked by `am_send_parts`.
                            buffer: unsafe { d.as_ptr().add(*s) } as *mut c_void,
                            length: e - s,
                        })
                        .collect()
                });
                let (buffer, count) = match &iov {
                    Some(iov) => {
                        p.op_attr_mask |= sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_DATATYPE;
                        p.datatype = sys::DATATYPE_IOV;
                        (iov.as_ptr() as *const c_void, iov.len())
                    }
                    None => {
                        let (d, s, e) = &parts[0];
                        // SAFETY: `s <= e <= d.len()`, checked by `am_send_parts`.
                        (unsafe { d.as_ptr().add(*s) } as *const c_void, e - s)
                    }
                };
                // The header must live until completion too.
                let keep = Arc::new(header);
                // SAFETY: header, parts and the iov array naming them live in
                // the tracked op until completion.
                let ret = unsafe {
                    self.ucx.lib.ucp_am_send_nbx(
                        e,
                        id as u32,
                        keep.as_ptr() as *const c_void,
                        keep.len(),
                        buffer,
                        count,
                        &p,
                    )
                };
                let mut held: Vec<Bytes> = parts.into_iter().map(|(d, _, _)| d).collect();
                held.push(keep);
                self.track("am_send", ret, held, iov, Done::Tx(done));
            }
            Cmd::Flush(ep, done) => {
                let e = match self.ep(ep) {
                    Ok(e) => e,
                    Err(err) => return Done::Tx(done).fire(Err(err)),
                };
                // SAFETY: zeroed params: no callback.
                let p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
                // SAFETY: `e` is a live endpoint.
                let ret = unsafe { self.ucx.lib.ucp_ep_flush_nbx(e, &p) };
                self.track("flush", ret, Vec::new(), None, Done::Tx(done));
            }
            Cmd::Handler(id, h, reply) => {
                let _ = reply.send(self.set_handler(id, h));
            }
            Cmd::Mapped(rkey, remote, reply) => {
                let r = match self.rkeys.get(&rkey.0) {
                    Some(&k) => {
                        let mut local: *mut c_void = std::ptr::null_mut();
                        // SAFETY: `k` is a live remote key of this worker;
                        // UCX only looks the address up and writes `local`.
                        let s = unsafe { self.ucx.lib.ucp_rkey_ptr(k, remote, &mut local) };
                        Ok(if s == sys::ucs_status_t_UCS_OK {
                            local as usize
                        } else {
                            0
                        })
                    }
                    None => Err(UcxError::Invalid("no such remote key".into())),
                };
                let _ = reply.send(r);
            }
            Cmd::EpFailed(ep, reply) => {
                let _ = reply.send(Ok(
                    self.failed.contains(&ep.0) || !self.eps.contains_key(&ep.0)
                ));
            }
        }
    }

    /// Connects, with peer-failure handling only when asked for and the
    /// transports can support it (shared-memory ones cannot).
    fn connect(&mut self, addr: &[u8]) -> Result<EpId> {
        let ep = self.create_ep(addr, self.peer_failure && !self.shm_only)?;
        let id = self.id();
        self.eps.insert(id, ep);
        Ok(EpId(id))
    }

    fn create_ep(&mut self, addr: &[u8], peer_errors: bool) -> Result<sys::ucp_ep_h> {
        // SAFETY: zeroed params; masked fields set below.
        let mut p: sys::ucp_ep_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_REMOTE_ADDRESS as u64;
        p.address = addr.as_ptr() as *const sys::ucp_address_t;
        if peer_errors {
            p.field_mask |= (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER)
                as u64;
            p.err_mode = sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER;
            p.err_handler = sys::ucp_err_handler_t {
                cb: Some(on_ep_error),
                arg: self as *mut State as *mut c_void,
            };
        }
        let mut ep: sys::ucp_ep_h = std::ptr::null_mut();
        // SAFETY: `addr` is a worker address a peer sent; UCX parses and
        // copies it during the call. The error handler's `arg` is this
        // boxed state, which outlives every endpoint.
        self.ucx.check("ep_create", unsafe {
            self.ucx.lib.ucp_ep_create(self.worker, &p, &mut ep)
        })?;
        Ok(ep)
    }

    fn map(&mut self, ptr: usize, len: usize) -> Result<Region> {
        // SAFETY: zeroed params; address and length set.
        let mut p: sys::ucp_mem_map_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_ADDRESS
            | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH)
            as u64;
        p.address = ptr as *mut c_void;
        p.length = len;
        if ptr == 0 {
            p.field_mask |= sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_FLAGS as u64;
            p.flags = sys::UCP_MEM_MAP_ALLOCATE;
        }
        let mut memh: sys::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: the caller of `Worker::map` promised the range stays
        // allocated; with a null address UCX allocates it.
        self.ucx.check("mem_map", unsafe {
            self.ucx.lib.ucp_mem_map(self.ctx, &p, &mut memh)
        })?;
        let ptr = if ptr != 0 {
            ptr
        } else {
            // SAFETY: zeroed attributes; address queried for a live handle.
            let mut attr: sys::ucp_mem_attr_t = unsafe { std::mem::zeroed() };
            attr.field_mask = sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_ADDRESS as u64;
            // SAFETY: `memh` was just mapped.
            let q = self.ucx.check("mem_query", unsafe {
                self.ucx.lib.ucp_mem_query(memh, &mut attr)
            });
            if let Err(e) = q {
                // SAFETY: mapped above, unmapped once.
                unsafe { self.ucx.lib.ucp_mem_unmap(self.ctx, memh) };
                return Err(e);
            }
            attr.address as usize
        };
        let mut buf: *mut c_void = std::ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: `memh` was just mapped; the packed buffer is copied and released.
        let packed = self.ucx.check("rkey_pack", unsafe {
            self.ucx
                .lib
                .ucp_rkey_pack(self.ctx, memh, &mut buf, &mut size)
        });
        if let Err(e) = packed {
            // SAFETY: mapped above, unmapped once.
            unsafe { self.ucx.lib.ucp_mem_unmap(self.ctx, memh) };
            return Err(e);
        }
        // SAFETY: UCX returned `size` bytes at `buf`.
        let rkey = unsafe { std::slice::from_raw_parts(buf as *const u8, size) }.to_vec();
        // SAFETY: `buf` came from `ucp_rkey_pack`.
        unsafe { self.ucx.lib.ucp_rkey_buffer_release(buf) };
        let id = self.id();
        self.mems.insert(id, memh);
        Ok(Region {
            id,
            base: ptr as u64,
            len,
            rkey,
        })
    }

    fn set_handler(&mut self, id: u16, h: AmHandler) -> Result<()> {
        self.handlers.insert(id, h);
        let slot = Box::new(AmSlot {
            state: self as *mut State,
            id,
        });
        // SAFETY: zeroed params; id, callback and arg set.
        let mut p: sys::ucp_am_handler_param_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ID
            | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_CB
            | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ARG)
            as u64;
        p.id = id as u32;
        p.cb = Some(on_am);
        p.arg = &*slot as *const AmSlot as *mut c_void;
        // SAFETY: the slot is kept in `self.slots` for the worker's life.
        self.ucx.check("set_am_recv_handler", unsafe {
            self.ucx.lib.ucp_worker_set_am_recv_handler(self.worker, &p)
        })?;
        self.slots.push(slot);
        Ok(())
    }

    fn shutdown(mut self: Box<Self>) {
        let eps: Vec<u64> = self.eps.keys().copied().collect();
        for id in eps {
            self.exec(Cmd::Close(EpId(id)));
        }
        // Give pending operations (closes included) a bounded time to finish.
        let deadline = now() + Duration::from_secs(2);
        while !self.ops.is_empty() && now() < deadline {
            // SAFETY: the worker is live and used only by this thread.
            unsafe { self.ucx.lib.ucp_worker_progress(self.worker) };
            self.reap();
        }
        for op in self.ops.drain(..) {
            // SAFETY: cancelled and freed once; its buffers drop after.
            unsafe {
                self.ucx.lib.ucp_request_cancel(self.worker, op.req);
                self.ucx.lib.ucp_request_free(op.req);
            }
            op.done.fire(Err(UcxError::WorkerGone));
        }
        for (_, k) in self.rkeys.drain() {
            // SAFETY: unpacked on this worker, destroyed once.
            unsafe { self.ucx.lib.ucp_rkey_destroy(k) };
        }
        for (_, m) in self.mems.drain() {
            // SAFETY: mapped on this context, unmapped once.
            unsafe { self.ucx.lib.ucp_mem_unmap(self.ctx, m) };
        }
        // SAFETY: nothing refers to the worker or context any more.
        unsafe {
            self.ucx.lib.ucp_worker_destroy(self.worker);
            self.ucx.lib.ucp_cleanup(self.ctx);
        }
    }
}
