//! The kernel's LOG line for a packet, as `nf_log_syslog` prints it
//! (docs/semantics.md 6): what Calico's `Log` rules write to syslog through
//! iptables' LOG target, and what operators grep for.
//!
//! Input is the packet's first bytes from the link-layer header on (as the
//! kernel programs capture them) and the IP packet's length; output is the
//! line, field for field as the kernel's, for IPv4 and IPv6, TCP, UDP,
//! UDPLite, ICMP (with the bracketed inner packet of errors), ICMPv6 and
//! any other protocol, without the kernel's optional extras (TCP sequence
//! numbers, IP and TCP options, socket UIDs: Calico's LOG rules ask for
//! none) and without `MARK=` (this dataplane's packets carry no mark).
//! Where the capture ends before a header the kernel would have read,
//! the line says `TRUNCATED` there.

use std::fmt::Write;

/// What the line needs besides the packet.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The prefix, already expanded, including any trailing space (Calico
    /// writes `calico-packet: `).
    pub prefix: &'a str,
    /// `IN=`: the interface the packet came in on, or empty.
    pub in_if: &'a str,
    /// `OUT=`: the interface it goes out of, or empty.
    pub out_if: &'a str,
}

/// The LOG line for `frame` (from its Ethernet header; up to two VLAN tags
/// are skipped) whose IP packet is `ip_len` bytes long.
pub fn line(ctx: &Context<'_>, frame: &[u8], ip_len: usize) -> String {
    let mut out = format!("{}IN={} OUT={} ", ctx.prefix, ctx.in_if, ctx.out_if);
    let Some((ethertype, l3)) = link(frame) else {
        out.push_str("TRUNCATED");
        return out;
    };
    // The kernel prints the MAC header only for packets that came in on an
    // interface: destination, source and the type after any VLAN tags (the
    // tags are not part of the header it sees).
    if !ctx.in_if.is_empty() {
        out.push_str("MAC=");
        let mac: Vec<String> = frame[..12]
            .iter()
            .chain(&ethertype.to_be_bytes())
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push_str(&mac.join(":"));
        out.push(' ');
    }
    let packet = Packet {
        bytes: &frame[l3..],
        len: ip_len,
    };
    match ethertype {
        0x0800 => ipv4(&mut out, &packet, 0),
        0x86dd => ipv6(&mut out, &packet, 0, true),
        _ => out.push_str("TRUNCATED"),
    }
    out
}

/// The IP packet's length as the kernel's stack sees it (the header's
/// length, the frame's padding trimmed), for a frame of `frame_len` bytes
/// whose first bytes are `frame`.
pub fn ip_length(frame: &[u8], frame_len: usize) -> usize {
    let Some((ethertype, l3)) = link(frame) else {
        return 0;
    };
    let left = frame_len.saturating_sub(l3);
    let h = &frame[l3.min(frame.len())..];
    let said = match ethertype {
        0x0800 if h.len() >= 4 => usize::from(u16::from_be_bytes([h[2], h[3]])),
        0x86dd if h.len() >= 6 => usize::from(u16::from_be_bytes([h[4], h[5]])) + 40,
        _ => left,
    };
    said.min(left)
}

/// The VLAN IDs of the tags at the front of `frame` (outer first).
pub fn vlan_ids(frame: &[u8]) -> Vec<u16> {
    let mut ids = Vec::new();
    let mut at = 12;
    while ids.len() < 2 {
        match frame.get(at..at + 4) {
            Some([0x81, 0x00, hi, lo] | [0x88, 0xa8, hi, lo]) => {
                ids.push(u16::from_be_bytes([*hi, *lo]) & 0x0fff);
                at += 4;
            }
            _ => break,
        }
    }
    ids
}

/// Ethernet: the type after up to two VLAN tags, and where it ends.
fn link(frame: &[u8]) -> Option<(u16, usize)> {
    let mut at = 12;
    for _ in 0..=2 {
        let t = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
        if t != 0x8100 && t != 0x88a8 {
            return Some((t, at + 2));
        }
        at += 4;
    }
    None
}

/// An IP packet: the captured bytes and the length the kernel sees.
struct Packet<'a> {
    bytes: &'a [u8],
    len: usize,
}

impl Packet<'_> {
    /// `n` bytes at `at`, if the packet has them and they were captured.
    fn get(&self, at: usize, n: usize) -> Option<&[u8]> {
        if at + n > self.len {
            return None;
        }
        self.bytes.get(at..at + n)
    }

    /// Whether the packet (not the capture) has `n` bytes at `at`: the
    /// kernel's test before it says INCOMPLETE.
    fn has(&self, at: usize, n: usize) -> bool {
        at + n <= self.len
    }

    /// An L4 header of `n` bytes at `at`, or what the kernel prints when
    /// the packet is shorter (`INCOMPLETE [n bytes]`), or `TRUNCATED` when
    /// the capture ends before it.
    fn header(&self, out: &mut String, at: usize, n: usize) -> Option<&[u8]> {
        if !self.has(at, n) {
            let _ = write!(out, "INCOMPLETE [{} bytes] ", self.len.saturating_sub(at));
            return None;
        }
        let h = self.get(at, n);
        if h.is_none() {
            out.push_str("TRUNCATED");
        }
        h
    }

    fn u16(&self, at: usize) -> u16 {
        self.get(at, 2)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// `dump_ipv4_packet`, from offset `at` (0, or the inner packet of an
/// ICMP error).
fn ipv4(out: &mut String, p: &Packet<'_>, at: usize) {
    let Some(h) = p.get(at, 20) else {
        out.push_str("TRUNCATED");
        return;
    };
    let _ = write!(
        out,
        "SRC={}.{}.{}.{} DST={}.{}.{}.{} ",
        h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19]
    );
    let tos = h[1];
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let _ = write!(
        out,
        "LEN={} TOS=0x{:02X} PREC=0x{:02X} TTL={} ID={} ",
        u16::from_be_bytes([h[2], h[3]]),
        tos & 0x1e,
        tos & 0xe0,
        h[8],
        u16::from_be_bytes([h[4], h[5]])
    );
    for (bit, name) in [(0x8000, "CE "), (0x4000, "DF "), (0x2000, "MF ")] {
        if frag & bit != 0 {
            out.push_str(name);
        }
    }
    let offset = frag & 0x1fff;
    if offset != 0 {
        let _ = write!(out, "FRAG:{offset} ");
    }
    let fragment = offset != 0;
    let l4 = at + usize::from(h[0] & 0x0f) * 4;
    match h[9] {
        6 => tcp(out, p, l4, fragment),
        17 | 136 => udp(out, p, h[9], l4, fragment),
        1 => icmp(out, p, at, l4, fragment),
        proto => {
            // AH and ESP print their SPI; nothing here runs them.
            let _ = write!(out, "PROTO={proto} ");
        }
    }
}

/// `nf_log_dump_tcp_header` without options or sequence numbers.
fn tcp(out: &mut String, p: &Packet<'_>, at: usize, fragment: bool) {
    out.push_str("PROTO=TCP ");
    if fragment {
        return;
    }
    let Some(t) = p.header(out, at, 20) else {
        return;
    };
    let _ = write!(
        out,
        "SPT={} DPT={} WINDOW={} RES=0x{:02x} ",
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[2], t[3]]),
        u16::from_be_bytes([t[14], t[15]]),
        // The three reserved bits, where the kernel's mask leaves them
        // (`(tcp_flag_word & TCP_RESERVED_BITS) >> 22`: 0x38 at most). The
        // fourth, once reserved, is AccECN's AE flag, which the kernels this
        // project runs on (6.x, checked against 6.18) print as a flag.
        (t[12] & 0x0e) << 2
    );
    if t[12] & 0x01 != 0 {
        out.push_str("AE ");
    }
    for (bit, name) in [
        (0x80, "CWR "),
        (0x40, "ECE "),
        (0x20, "URG "),
        (0x10, "ACK "),
        (0x08, "PSH "),
        (0x04, "RST "),
        (0x02, "SYN "),
        (0x01, "FIN "),
    ] {
        if t[13] & bit != 0 {
            out.push_str(name);
        }
    }
    let _ = write!(out, "URGP={} ", u16::from_be_bytes([t[18], t[19]]));
}

/// `nf_log_dump_udp_header` (UDP and UDPLite).
fn udp(out: &mut String, p: &Packet<'_>, proto: u8, at: usize, fragment: bool) {
    out.push_str(if proto == 17 {
        "PROTO=UDP "
    } else {
        "PROTO=UDPLITE "
    });
    if fragment {
        return;
    }
    if p.header(out, at, 8).is_none() {
        return;
    }
    let _ = write!(
        out,
        "SPT={} DPT={} LEN={} ",
        p.u16(at),
        p.u16(at + 2),
        p.u16(at + 4)
    );
}

/// Bytes an ICMP message of each type must have for the kernel to print
/// it (`required_len` in nf_log_syslog.c).
fn icmp_required(t: u8) -> usize {
    match t {
        0 | 8 => 4,
        3 | 4 | 5 | 11 | 12 => 8 + 20,
        13 | 14 => 20,
        17 | 18 => 12,
        _ => 0,
    }
}

/// `PROTO=<name> TYPE= CODE=` of ICMP and ICMPv6: the message's first 8
/// bytes, unless the packet is a later fragment or too short.
fn icmp_head<'a>(
    out: &mut String,
    p: &'a Packet<'_>,
    name: &str,
    at: usize,
    fragment: bool,
) -> Option<&'a [u8]> {
    let _ = write!(out, "PROTO={name} ");
    if fragment {
        return None;
    }
    let h = p.header(out, at, 8)?;
    let _ = write!(out, "TYPE={} CODE={} ", h[0], h[1]);
    Some(h)
}

fn icmp(out: &mut String, p: &Packet<'_>, ip_at: usize, at: usize, fragment: bool) {
    let Some(h) = icmp_head(out, p, "ICMP", at, fragment) else {
        return;
    };
    let (t, code) = (h[0], h[1]);
    let required = icmp_required(t);
    if required != 0 && p.len.saturating_sub(at) < required {
        let _ = write!(out, "INCOMPLETE [{} bytes] ", p.len.saturating_sub(at));
        return;
    }
    match t {
        0 | 8 => {
            let _ = write!(
                out,
                "ID={} SEQ={} ",
                u16::from_be_bytes([h[4], h[5]]),
                u16::from_be_bytes([h[6], h[7]])
            );
        }
        12 => {
            let _ = write!(out, "PARAMETER={} ", h[4]);
        }
        3 | 4 | 5 | 11 => {
            if t == 5 {
                let _ = write!(out, "GATEWAY={}.{}.{}.{} ", h[4], h[5], h[6], h[7]);
            }
            // The kernel recurses once: into the outer packet's error only.
            if ip_at == 0 {
                out.push('[');
                ipv4(out, p, at + 8);
                out.push_str("] ");
            }
            if t == 3 && code == 4 {
                let _ = write!(out, "MTU={} ", u16::from_be_bytes([h[6], h[7]]));
            }
        }
        _ => {}
    }
}

/// IPv6 as `%pI6` prints it: eight groups of four hex digits.
fn ip6(b: &[u8]) -> String {
    b.chunks(2)
        .map(|g| format!("{:02x}{:02x}", g[0], g[1]))
        .collect::<Vec<_>>()
        .join(":")
}

/// `dump_ipv6_packet`, from offset `at`; `recurse` for the outer packet.
fn ipv6(out: &mut String, p: &Packet<'_>, at: usize, recurse: bool) {
    let Some(h) = p.get(at, 40) else {
        out.push_str("TRUNCATED");
        return;
    };
    let first = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let _ = write!(
        out,
        "SRC={} DST={} LEN={} TC={} HOPLIMIT={} FLOWLBL={} ",
        ip6(&h[8..24]),
        ip6(&h[24..40]),
        usize::from(u16::from_be_bytes([h[4], h[5]])) + 40,
        (first & 0x0ff0_0000) >> 20,
        h[7],
        first & 0x000f_ffff
    );
    let mut next = h[6];
    let mut ptr = at + 40;
    let mut fragment = false;
    // The extension headers the kernel walks (nf_ip6_ext_hdr), up to the
    // chain's end.
    while matches!(next, 0 | 43 | 44 | 50 | 51 | 60) {
        let Some(e) = p.get(ptr, 2) else {
            out.push_str("TRUNCATED");
            return;
        };
        let len = match next {
            44 => {
                out.push_str("FRAG:");
                let Some(f) = p.get(ptr, 8) else {
                    out.push_str("TRUNCATED ");
                    return;
                };
                let off = u16::from_be_bytes([f[2], f[3]]);
                let _ = write!(out, "{} ", off & 0xfff8);
                if off & 1 != 0 {
                    out.push_str("INCOMPLETE ");
                }
                let _ = write!(
                    out,
                    "ID:{:08x} ",
                    u32::from_be_bytes([f[4], f[5], f[6], f[7]])
                );
                if off & 0xfff8 != 0 {
                    fragment = true;
                }
                8
            }
            0 | 43 | 60 => {
                if fragment {
                    return;
                }
                (usize::from(e[1]) + 1) * 8
            }
            51 => {
                // AH: the kernel prints PROTO=AH and its SPI, then stops.
                out.push_str("PROTO=AH ");
                return;
            }
            _ => {
                out.push_str("PROTO=ESP ");
                return;
            }
        };
        next = e[0];
        ptr += len;
    }
    match next {
        6 => tcp(out, p, ptr, fragment),
        17 | 136 => udp(out, p, next, ptr, fragment),
        58 => icmp6(out, p, ptr, fragment, recurse),
        proto => {
            let _ = write!(out, "PROTO={proto} ");
        }
    }
}

fn icmp6(out: &mut String, p: &Packet<'_>, at: usize, fragment: bool, recurse: bool) {
    let Some(h) = icmp_head(out, p, "ICMPv6", at, fragment) else {
        return;
    };
    let t = h[0];
    let word = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    match t {
        128 | 129 => {
            let _ = write!(
                out,
                "ID={} SEQ={} ",
                u16::from_be_bytes([h[4], h[5]]),
                u16::from_be_bytes([h[6], h[7]])
            );
        }
        1..=4 => {
            if t == 4 {
                let _ = write!(out, "POINTER={word:08x} ");
            }
            if recurse {
                out.push('[');
                ipv6(out, p, at + 8, false);
                out.push_str("] ");
            }
            if t == 2 {
                let _ = write!(out, "MTU={word} ");
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Context<'static> = Context {
        prefix: "calico-packet: ",
        in_if: "eth1",
        out_if: "",
    };

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    const ETH: &str = "0200000000 01 0200000000 02 0800";

    #[test]
    fn a_tcp_syn_reads_as_the_kernel_prints_it() {
        let frame = hex(&format!(
            "{ETH} 45000034 1c46 4000 40 06 0000 c0000210 c0000201 \
             d4311b58 00000000 00000000 8002 faf0 0000 0000 \
             020405b4 01010402 01030307"
        ));
        assert_eq!(
            line(&CTX, &frame, 52),
            "calico-packet: IN=eth1 OUT= MAC=02:00:00:00:00:01:02:00:00:00:00:02:08:00 \
             SRC=192.0.2.16 DST=192.0.2.1 LEN=52 TOS=0x00 PREC=0x00 TTL=64 ID=7238 DF \
             PROTO=TCP SPT=54321 DPT=7000 WINDOW=64240 RES=0x00 SYN URGP=0 "
        );
    }

    #[test]
    fn an_icmp_error_prints_its_inner_packet_in_brackets() {
        let inner = "45000021 0001 0000 40 11 0000 c0000201 c0000210 9c40 0035 000d 0000";
        let frame = hex(&format!(
            "{ETH} 4500 0038 0002 0000 40 01 0000 c0000210 c0000201 0303 0000 00000000 {inner} 00"
        ));
        assert_eq!(
            line(&Context { in_if: "", ..CTX }, &frame, 56),
            "calico-packet: IN= OUT= SRC=192.0.2.16 DST=192.0.2.1 LEN=56 TOS=0x00 PREC=0x00 TTL=64 ID=2 \
             PROTO=ICMP TYPE=3 CODE=3 [SRC=192.0.2.1 DST=192.0.2.16 LEN=33 TOS=0x00 PREC=0x00 TTL=64 ID=1 \
             PROTO=UDP SPT=40000 DPT=53 LEN=13 ] "
        );
    }

    #[test]
    fn ipv6_addresses_are_written_in_full_and_fragments_stop_at_the_fragment() {
        let frame = hex("0200000000 01 0200000000 02 86dd 6 00 12345 0010 2c 40 \
             20010db8000000000000000000000010 20010db8000000000000000000000001 \
             11 00 0001 0000abcd 0000000000000000");
        assert_eq!(
            line(&CTX, &frame, 56),
            "calico-packet: IN=eth1 OUT= MAC=02:00:00:00:00:01:02:00:00:00:00:02:86:dd \
             SRC=2001:0db8:0000:0000:0000:0000:0000:0010 DST=2001:0db8:0000:0000:0000:0000:0000:0001 \
             LEN=56 TC=0 HOPLIMIT=64 FLOWLBL=74565 FRAG:0 INCOMPLETE ID:0000abcd PROTO=UDP SPT=0 DPT=0 LEN=0 "
        );
    }
}
