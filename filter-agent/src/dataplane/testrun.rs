//! Test runs: the loaded programs under `BPF_PROG_TEST_RUN` on crafted
//! frames (kernel tests, `explain --dataplane`, the benchmark).

use super::*;

/// Runs an XDP program `repeat` times on `frame` with BPF_PROG_TEST_RUN, as
/// if it arrived on `ifindex`. Returns the action and the mean time per run.
pub(super) fn run_xdp(
    xdp: &mut Xdp,
    name: &str,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(u32, Duration), Error> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex }: the kernel requires data = 0 and
    // data_end = the frame's length.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    };
    xdp.test_run(opts)
        .map(|r| (r.return_value, r.duration))
        .map_err(|e| Error::Load {
            what: format!("test run of {name}"),
            source: Box::new(e),
        })
}

/// Runs a TC program `repeat` times on `frame` with BPF_PROG_TEST_RUN as
/// `run` describes. Returns the TC action, the skb mark the program left
/// and the mean time per run.
pub(super) fn run_tc(
    tc: &mut SchedClassifier,
    name: &str,
    frame: &[u8],
    run: TcRun,
    repeat: u32,
) -> Result<(i32, u32, Duration), Error> {
    // struct __sk_buff up to `ifindex` (offset 40): len, pkt_type, mark
    // (8), queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto,
    // priority, ingress_ifindex (36), ifindex (40). The kernel accepts a
    // prefix of the context and lets a test set these three.
    let mut ctx = [0u8; 44];
    ctx[8..12].copy_from_slice(&run.mark.to_ne_bytes());
    ctx[36..40].copy_from_slice(&run.ingress_ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&run.ifindex.to_ne_bytes());
    // The kernel hands back the whole context; a shorter buffer is ENOSPC.
    let mut ctx_out = [0u8; 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        ctx_out: Some(&mut ctx_out),
        repeat,
        ..Default::default()
    };
    let r = tc.test_run(opts).map_err(|e| Error::Load {
        what: format!("test run of {name}"),
        source: Box::new(e),
    })?;
    let mark = u32::from_ne_bytes(ctx_out[8..12].try_into().expect("4 bytes"));
    Ok((r.return_value as i32, mark, r.duration))
}

/// A test run of a TC program (see [`Dataplane::test_run_tc`]).
#[derive(Debug, Clone, Copy)]
pub struct TcRun {
    /// `fw_tc_in` (else `fw_tc_eg`).
    pub ingress: bool,
    /// The interface the program runs on (must exist in this namespace).
    pub ifindex: u32,
    /// The interface a forwarded packet came in by; 0: sent by this host.
    pub ingress_ifindex: u32,
    /// The skb mark on entry.
    pub mark: u32,
}

impl TcRun {
    /// The program the run is of: `fw_tc_in` or `fw_tc_eg`.
    pub fn program(&self) -> &'static str {
        if self.ingress {
            names::PROG_TC_INGRESS
        } else {
            names::PROG_TC_EGRESS
        }
    }
}

impl Dataplane {
    /// Runs `fw_xdp` once on `frame` with `BPF_PROG_TEST_RUN`, as if it
    /// arrived on `ifindex` (which must exist in this namespace; the
    /// loopback, 1, always does). Returns the XDP action.
    pub fn test_run_xdp(&mut self, frame: &[u8], ifindex: u32) -> Result<u32, Error> {
        self.time_xdp(frame, ifindex, 1, false)
            .map(|(action, _)| action)
    }

    /// Per-packet cost of `fw_xdp` (or, with `baseline`, of a program that
    /// only returns XDP_PASS) on `frame`, from BPF_PROG_TEST_RUN repeated
    /// `repeat` times: the kernel reports the mean per run.
    pub fn time_xdp(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
        baseline: bool,
    ) -> Result<(u32, Duration), Error> {
        let name = if baseline {
            names::PROG_PASS
        } else {
            names::PROG_XDP
        };
        // The pass program is loaded on first use (`fw_xdp` always is).
        let xdp = self.loaded_xdp(name)?;
        run_xdp(xdp, name, frame, ifindex, repeat)
    }

    /// The XDP program `name`, loaded into the kernel if it is not yet:
    /// the benchmark's programs are loaded only when it asks for them.
    fn loaded_xdp(&mut self, name: &'static str) -> Result<&mut Xdp, Error> {
        let xdp: &mut Xdp = self.program(name)?;
        if xdp.fd().is_err() {
            xdp.load().map_err(|e| Error::Load {
                what: name.into(),
                source: Box::new(e),
            })?;
        }
        Ok(xdp)
    }

    /// Per-packet cost of `fw_tc_in` or `fw_tc_eg` as `run` describes (or,
    /// with `baseline`, of a TC program that only returns TC_ACT_OK) on
    /// `frame`, repeated `repeat` times: the TC action and the mean time.
    pub fn time_tc(
        &mut self,
        frame: &[u8],
        run: TcRun,
        repeat: u32,
        baseline: bool,
    ) -> Result<(i32, Duration), Error> {
        let name = if baseline {
            names::PROG_TC_PASS
        } else {
            run.program()
        };
        let tc: &mut SchedClassifier = self.program(name)?;
        if baseline && tc.fd().is_err() {
            tc.load().map_err(|e| Error::Load {
                what: name.into(),
                source: Box::new(e),
            })?;
        }
        run_tc(tc, name, frame, run, repeat).map(|(action, _, took)| (action, took))
    }

    /// Attaches `fw_drop` (XDP_DROP and nothing else) to `ifindex` of the
    /// caller's network namespace in native mode: the ceiling of the
    /// real-traffic benchmark. It stays attached while this dataplane is
    /// loaded.
    pub fn attach_drop(&mut self, ifindex: u32) -> Result<(), Error> {
        let name = names::PROG_DROP;
        self.loaded_xdp(name)?
            .attach(
                aya::programs::NetworkInterface::Index(ifindex),
                XdpMode::Driver,
            )
            .map_err(|e| Error::Load {
                what: name.into(),
                source: Box::new(e),
            })?;
        Ok(())
    }

    /// Runs `fw_tc_in` or `fw_tc_eg` once on `frame` with
    /// `BPF_PROG_TEST_RUN` as `run` describes. Returns the TC action (0
    /// `TC_ACT_OK`, 2 `TC_ACT_SHOT`) and the skb mark the program left.
    pub fn test_run_tc(&mut self, frame: &[u8], run: TcRun) -> Result<(i32, u32), Error> {
        let name = run.program();
        let tc: &mut SchedClassifier = self.program(name)?;
        run_tc(tc, name, frame, run, 1).map(|(action, mark, _)| (action, mark))
    }
}
