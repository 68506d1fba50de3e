//! Attaching: XDP (native, else generic) and TC on host endpoints, TC
//! egress on every other interface, through links pinned on bpffs; links
//! of a previous agent are adopted, stale ones detached.

use super::pins::{is_link_pin, link_pin};
use super::*;

/// What an interface is to the firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// A host endpoint: XDP, TC ingress and TC egress.
    Endpoint,
    /// Any other interface: TC egress, for forwarded traffic that came in
    /// by an endpoint.
    ForwardOnly,
}

impl Role {
    pub(super) fn programs(self) -> &'static [&'static str] {
        match self {
            Role::Endpoint => &ATTACHED_PROGRAMS,
            Role::ForwardOnly => &[names::PROG_TC_EGRESS],
        }
    }
}

/// Programs attached to one interface, through links pinned on bpffs so
/// they outlive the agent.
#[derive(Debug)]
pub(super) struct Attachment {
    pub(super) ifindex: u32,
    pub(super) role: Role,
    pub(super) xdp_mode: &'static str,
    /// (link, its pin) for fw_xdp, fw_tc_in, fw_tc_eg.
    pub(super) links: Vec<(FdLink, PathBuf)>,
}

impl Dataplane {
    /// Attaches to bound interfaces that lack programs (adopting links a
    /// previous agent pinned), detaches from interfaces no longer bound (or
    /// gone), and removes link pins nobody claims.
    pub(super) fn sync_attachments(
        &mut self,
        compiled: &Compiled,
        ifaces: &Interfaces,
    ) -> Result<(), Error> {
        // Host endpoints get all three programs; every other interface
        // (loopback aside) TC egress only, for the forward stage of traffic
        // that came in by an endpoint (docs/design.md).
        let endpoints: BTreeSet<&str> = compiled
            .endpoints
            .iter()
            .map(|e| e.iface.as_str())
            .collect();
        let wanted: BTreeMap<&str, (u32, Role)> = ifaces
            .iter()
            .filter(|(name, _)| name.as_str() != "lo")
            .map(|(name, &i)| {
                let role = if endpoints.contains(name.as_str()) {
                    Role::Endpoint
                } else {
                    Role::ForwardOnly
                };
                (name.as_str(), (i, role))
            })
            .collect();
        let stale: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, a)| wanted.get(name.as_str()) != Some(&(a.ifindex, a.role)))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.detach(&name)?;
        }
        for (name, (ifindex, role)) in wanted {
            if !self.attached.contains_key(name) {
                self.attach(name, ifindex, role)?;
            }
        }
        // Links of interfaces this policy no longer binds (or that went):
        // unpinning the last reference detaches them.
        let claimed: Vec<&PathBuf> = self
            .attached
            .values()
            .flat_map(|a| a.links.iter().map(|(_, p)| p))
            .collect();
        super::pins::unpin_where(
            &self.pin_dir,
            "detaching a link no endpoint claims",
            |path| is_link_pin(path) && !claimed.iter().any(|c| c.as_path() == path),
        )
    }

    /// Attaches the three programs to `iface`. A link pinned by a previous
    /// agent is kept and its program swapped for ours in one update, so
    /// enforcement never lapses (docs/design.md, "Pinning and restarts").
    pub(super) fn attach(&mut self, iface: &str, ifindex: u32, role: Role) -> Result<(), Error> {
        let err =
            |program: &'static str, e: Box<dyn std::error::Error + Send + Sync>| Error::Load {
                what: format!("attach {program} on {iface}"),
                source: e,
            };
        let dir = self.pin_dir.clone();
        let mut links = Vec::new();
        let mut xdp_mode = if role == Role::Endpoint {
            "native"
        } else {
            "none"
        };
        for &program in role.programs() {
            let pin = link_pin(&dir, iface, ifindex, program);
            let fd = if pin.exists() {
                let old = FdLink::from(
                    PinnedLink::from_pin(&pin).map_err(|e| err(program, Box::new(e)))?,
                );
                if program == names::PROG_XDP {
                    xdp_mode = "adopted";
                }
                if program == names::PROG_XDP {
                    let xdp: &mut Xdp = self.program(program)?;
                    let link = XdpLink::try_from(old).map_err(|e| err(program, Box::new(e)))?;
                    let id = xdp
                        .attach_to_link(link)
                        .map_err(|e| err(program, Box::new(e)))?;
                    FdLink::try_from(xdp.take_link(id).map_err(|e| err(program, Box::new(e)))?)
                        .map_err(|e| err(program, Box::new(e)))?
                } else {
                    let tc: &mut SchedClassifier = self.program(program)?;
                    let link = SchedClassifierLink::try_from(old)
                        .map_err(|e| err(program, Box::new(e)))?;
                    let id = tc
                        .attach_to_link(link)
                        .map_err(|e| err(program, Box::new(e)))?;
                    FdLink::try_from(tc.take_link(id).map_err(|e| err(program, Box::new(e)))?)
                        .map_err(|e| err(program, Box::new(e)))?
                }
            } else {
                let fd = if program == names::PROG_XDP {
                    let xdp: &mut Xdp = self.program(program)?;
                    // Native where the driver has it, generic otherwise.
                    let id = match xdp.attach(
                        aya::programs::NetworkInterface::Index(ifindex),
                        XdpMode::Driver,
                    ) {
                        Ok(id) => id,
                        Err(native) => {
                            tracing::warn!(iface, cause = %native, "native XDP unavailable, using generic mode");
                            xdp_mode = "generic";
                            xdp.attach(
                                aya::programs::NetworkInterface::Index(ifindex),
                                XdpMode::Skb,
                            )
                            .map_err(|e| err(program, Box::new(e)))?
                        }
                    };
                    FdLink::try_from(xdp.take_link(id).map_err(|e| err(program, Box::new(e)))?)
                        .map_err(|e| err(program, Box::new(e)))?
                } else {
                    let tc: &mut SchedClassifier = self.program(program)?;
                    let kind = if program == names::PROG_TC_INGRESS {
                        TcAttachType::Ingress
                    } else {
                        TcAttachType::Egress
                    };
                    let id = tc
                        .attach(aya::programs::NetworkInterface::Index(ifindex), kind)
                        .map_err(|e| err(program, Box::new(e)))?;
                    FdLink::try_from(tc.take_link(id).map_err(|e| err(program, Box::new(e)))?)
                        .map_err(|e| err(program, Box::new(e)))?
                };
                FdLink::from(fd.pin(&pin).map_err(|e| err(program, Box::new(e)))?)
            };
            links.push((fd, pin));
        }
        tracing::info!(iface, ifindex, xdp_mode, programs = ?role.programs(), "programs attached");
        self.attached.insert(
            iface.to_owned(),
            Attachment {
                ifindex,
                role,
                xdp_mode,
                links,
            },
        );
        Ok(())
    }

    /// Detaches the programs from `iface`: unpinning a link and closing its
    /// last descriptor destroys it.
    pub(super) fn detach(&mut self, iface: &str) -> Result<(), Error> {
        let Some(a) = self.attached.remove(iface) else {
            return Ok(());
        };
        for (fd, pin) in a.links {
            if let Err(e) = std::fs::remove_file(&pin) {
                // An interface that vanished may have taken its pins' meaning
                // with it; nothing else to undo.
                tracing::debug!(iface, pin = %pin.display(), error = %e, "unpin");
            }
            drop(fd);
        }
        tracing::info!(iface, "programs detached");
        Ok(())
    }

    /// Interfaces with programs attached, and their XDP mode (`adopted`
    /// when a previous agent attached them).
    pub fn attachments(&self) -> Vec<(String, u32, &'static str)> {
        self.attached
            .iter()
            .map(|(n, a)| (n.clone(), a.ifindex, a.xdp_mode))
            .collect()
    }
}
