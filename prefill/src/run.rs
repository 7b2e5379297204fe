//! A stage's process: its links, the event relay and the main loop.

use super::*;

/// Runs stage `node` until `stop` is set. Call from a plain thread: it
/// starts its own tokio runtime for the links.
pub fn run(
    file: &ModelFile,
    setup: NodeSetup,
    threads: usize,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let cluster = &setup.cluster;
    let (pipeline, index) = cluster
        .pipelines
        .iter()
        .find_map(|p| {
            p.stages
                .iter()
                .position(|s| s.0 == setup.name)
                .map(|i| (p.clone(), i))
        })
        .ok_or_else(|| {
            PrefillError::Setup(format!(
                "'{}' is not a prefill stage in the cluster file",
                setup.name
            ))
        })?;
    let (_, addr, layers) = pipeline.stages[index].clone();
    let cfg = &file.config;
    let block_size = cluster.file.cluster.block_size;
    let group = RankGroup::new(
        file,
        &RankGroupOptions {
            layers: layers.clone(),
            tp: 1,
            ep: 1,
            block_size,
            kv_dtype: cluster.kv_dtype,
            kv_blocks: pipeline.kv_blocks,
            formats: Formats::PREFILL,
            threads,
            device: cluster.device_of(&setup.name),
            gpu_dtype: cluster.gpu_dtype,
        },
    )?;
    let desc = PoolDesc::new(
        layers,
        0..cfg.n_kv_heads,
        block_size,
        cfg.head_dim,
        cluster.kv_dtype,
    );
    let rt = tandem_wire::node::io_runtime(&setup.name)?;
    let (tx, rx) = mpsc::channel();
    let preempt = Arc::new(AtomicBool::new(false));
    let tx = relay(tx, preempt.clone())?;
    let beat = Arc::new(Mutex::new(Beat::default()));
    let metrics = setup.metrics("prefill", &setup.model_name(file))?;
    let role = Role::Prefill {
        pipeline: pipeline.name.clone(),
        stage: index as u32,
    };
    let hello = setup.me(role);
    let live = setup.liveness();
    {
        let _g = rt.enter();
        let ep = tandem_wire::quic::endpoint(addr.bind(), &setup.identity, live)?;
        spawn_acceptor(ep.clone(), hello.clone(), tx.clone());
        let gw = &cluster.file.gateway;
        spawn_dialer(
            ep.clone(),
            gw.quic.clone(),
            gw.name.clone(),
            hello.clone(),
            tx.clone(),
        );
        for d in &cluster.file.decode {
            spawn_dialer(
                ep.clone(),
                d.addr.clone(),
                d.name.clone(),
                hello.clone(),
                tx.clone(),
            );
        }
        if let Some((name, addr, _)) = pipeline.stages.get(index + 1) {
            spawn_dialer(
                ep.clone(),
                addr.clone(),
                name.clone(),
                hello.clone(),
                tx.clone(),
            );
        }
        setup.spawn_services(&beat, metrics.clone())?;
    }
    let seq = Sequencer::new(
        SeqConfig {
            index,
            prev: index.checked_sub(1).map(|i| pipeline.stages[i].0.clone()),
            next: pipeline.stages.get(index + 1).map(|s| s.0.clone()),
            decode_groups: cluster.file.decode.iter().map(|d| d.name.clone()).collect(),
            chunk: pipeline.chunk,
            block_size,
            n_kv_heads: cfg.n_kv_heads,
            n_layers: cfg.n_layers,
            desc: desc.clone(),
        },
        pipeline.kv_blocks,
    );
    let st_transport = pipeline.kv_transport;
    // Only the last stage chooses tokens.
    let grammar = if index + 1 == pipeline.stages.len() {
        tandem_model::GrammarEnv::new(&file.tokenizer)
            .map_err(|e| tracing::warn!("{}: no structured outputs: {e}", setup.name))
            .ok()
    } else {
        None
    };
    let mut st = Stage {
        name: setup.name.clone(),
        pipeline,
        desc,
        group,
        seq,
        block_size,
        links: Links::default(),
        beat,
        ucx: start_ucx(&setup.name, st_transport)?,
        ucx_peers: HashMap::new(),
        faults: Faults::from_env(),
        preempt,
        grammar,
        metrics,
        spans: HashMap::new(),
    };
    let gateway = cluster.file.gateway.name.clone();
    tracing::info!("{}: prefill stage {index} ready at {addr}", st.name);
    let _ = st.block_size;
    while !stop.load(Ordering::Relaxed) {
        // Cleared before the events are read: work that arrives from here on
        // sets it again and stops a warming pass.
        st.preempt.store(false, Ordering::Release);
        // Events first, so aborts and new requests are seen between chunks.
        let ev = if !st.seq.has_work() {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(ev) => Some(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            rx.try_recv().ok()
        };
        if let Some(ev) = ev {
            st.on_event(ev);
            while let Ok(ev) = rx.try_recv() {
                st.on_event(ev);
            }
        }
        // Requests someone waits for go before cache warming.
        if let Some(w) = st.seq.next_work() {
            st.step(w);
        }
        // A request's spans end with it (done, failed or aborted).
        if st.spans.len() > st.seq.reqs.len() + st.seq.waiting.len() {
            let Stage { spans, seq, .. } = &mut st;
            spans.retain(|k, _| {
                seq.reqs.contains_key(k) || seq.waiting.iter().any(|r| (r.id, r.lease) == *k)
            });
        }
        let (total, free) = (st.seq.cache.total(), st.seq.cache.available());
        st.metrics
            .serving
            .load(st.seq.reqs.len(), st.seq.waiting.len(), total - free, total);
        {
            let mut b = st.beat.lock().expect("heartbeat state");
            b.load = Load {
                running: st.seq.reqs.len() as u32,
                queued: st.seq.waiting.len() as u32,
                free_blocks: st.seq.cache.available() as u32,
                total_blocks: st.seq.cache.total() as u32,
                ..Load::default()
            };
            b.gateway = st.links.get(&gateway).cloned();
        }
    }
    drop(st);
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}

/// The links' events go through this thread on their way to the stage, which
/// raises `preempt` as real work passes: the stage's own thread is inside a
/// forward pass then, not reading events.
fn relay(to: mpsc::Sender<NetEvent>, preempt: Arc<AtomicBool>) -> Result<mpsc::Sender<NetEvent>> {
    let (tx, rx) = mpsc::channel::<NetEvent>();
    std::thread::Builder::new()
        .name("prefill-events".into())
        .spawn(move || {
            for ev in rx {
                let real = match &ev {
                    NetEvent::Message {
                        msg: Message::Prefill(r),
                        ..
                    } => !r.warm,
                    NetEvent::Message {
                        msg: Message::Activations(a),
                        ..
                    } => !a.warm,
                    _ => false,
                };
                if to.send(ev).is_err() {
                    return;
                }
                if real {
                    preempt.store(true, Ordering::Release);
                }
            }
        })
        .map_err(|e| PrefillError::Setup(format!("cannot start the event relay: {e}")))?;
    Ok(tx)
}

/// Starts UCX when the pipeline wants it: `ucx` without the library is an
/// error, `auto` falls back to QUIC with a warning.
fn start_ucx(name: &str, t: KvTransport) -> Result<Option<Arc<Worker>>> {
    if t == KvTransport::Quic {
        return Ok(None);
    }
    let ucx = match Ucx::load(None) {
        Ok(u) => u,
        Err(e) if t == KvTransport::Ucx => {
            return Err(PrefillError::Setup(format!(
            "kv_transport is \"ucx\" but {e}; install UCX (libucx0) or set kv_transport = \"quic\""
        )))
        }
        Err(e) => {
            tracing::warn!("{name}: {e}; KV goes over QUIC");
            return Ok(None);
        }
    };
    let w = Worker::start(ucx, &WorkerOptions::default(), "ucx-prefill")
        .map_err(|e| PrefillError::Setup(e.to_string()))?;
    Ok(Some(Arc::new(w)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_wire::messages::{Lease, PrefillRequest, RequestId};

    fn prefill(warm: bool) -> NetEvent {
        NetEvent::Message {
            peer: "d0".into(),
            link: 1,
            msg: Message::Prefill(PrefillRequest {
                id: RequestId(1),
                lease: Lease(5),
                decode: "d0".into(),
                tokens: vec![1, 2, 3],
                cached: 0,
                reuse_from: 0,
                reuse: true,
                targets: Vec::new(),
                params: tandem_model::SamplingParams::greedy(1),
                output_from: 3,
                deadline_ms: now_ms() + 60_000,
                warm,
                trace: Default::default(),
            }),
        }
    }

    fn activations(warm: bool) -> NetEvent {
        NetEvent::Message {
            peer: "p0-s0".into(),
            link: 2,
            msg: Message::Activations(Activations {
                id: RequestId(1),
                lease: Lease(5),
                pos: 0,
                n: 1,
                hidden: vec![0.0; 4],
                warm,
            }),
        }
    }

    /// Every event reaches the stage in order; only real work raises the
    /// flag that stops a warming pass, and warming traffic leaves it down.
    #[test]
    fn the_relay_passes_events_on_and_flags_only_real_work() {
        let (to, from) = mpsc::channel();
        let flag = Arc::new(AtomicBool::new(false));
        let tx = relay(to, flag.clone()).expect("relay");
        let recv = || {
            from.recv_timeout(Duration::from_secs(5))
                .expect("passed on")
        };
        for ev in [prefill(true), activations(true)] {
            tx.send(ev).unwrap();
            recv();
            assert!(!flag.load(Ordering::Acquire), "warming does not preempt");
        }
        for ev in [prefill(false), activations(false)] {
            flag.store(false, Ordering::Release);
            tx.send(ev).unwrap();
            match recv() {
                NetEvent::Message { msg, .. } => {
                    assert!(matches!(msg, Message::Prefill(_) | Message::Activations(_)))
                }
                _ => panic!("the event changed on the way"),
            }
            // Raised just after the event is passed on.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !flag.load(Ordering::Acquire) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(flag.load(Ordering::Acquire), "real work preempts");
        }
    }
}
