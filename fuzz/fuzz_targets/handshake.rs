//! The handshake as a node judges it: whatever a peer sends as its
//! `Hello`, and whatever certificate bytes it shows, the node decodes them
//! without panicking, and admits a peer only as exactly the node and role
//! its certificate names and the cluster file lists.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tandem_wire::codec;
use tandem_wire::messages::{Hello, Role};
use tandem_wire::quic::{admit, Roster};
use tandem_wire::tls::{self, ClusterCa};

/// Two real certificates (a stage's and the gateway's) and a roster.
fn fixtures() -> &'static (Vec<Vec<u8>>, Arc<Roster>) {
    static F: OnceLock<(Vec<Vec<u8>>, Arc<Roster>)> = OnceLock::new();
    F.get_or_init(|| {
        let ca = ClusterCa::generate("fuzz").expect("ca");
        let ip = [std::net::IpAddr::from([127, 0, 0, 1])];
        let certs = [("p0-s0", "prefill"), ("gateway", "gateway")]
            .iter()
            .map(|(n, r)| ca.identity(n, r, &ip).expect("cert").cert.to_vec())
            .collect();
        let mut roster = Roster::new();
        roster.insert("gateway".into(), Role::Gateway);
        roster.insert("p0-s0".into(), Role::Prefill { pipeline: "p0".into(), stage: 0 });
        (certs, Arc::new(roster))
    })
}

fuzz_target!(|data: &[u8]| {
    let (certs, roster) = fixtures();
    let split = data.first().map_or(0, |&b| b as usize).min(data.len().saturating_sub(1));
    let (hello_bytes, der) = data.get(1..).unwrap_or(&[]).split_at(split.min(data.len().saturating_sub(1)));
    // Arbitrary certificate bytes: an error, never a panic, and never
    // admitted.
    if let Ok(h) = codec::decode::<Hello>(hello_bytes) {
        assert!(admit(der, &h.node, &h.role, Some(roster)).is_err() || tls::claim_of(der).is_ok());
        // A real certificate: admitted only as what it names.
        for cert in certs {
            if admit(cert, &h.node, &h.role, Some(roster)).is_ok() {
                let (role, node) = tls::claim_of(cert).expect("a real certificate");
                assert_eq!(node, h.node);
                assert_eq!(role, tls::role_kind(&h.role));
                assert_eq!(roster.get(&h.node), Some(&h.role));
            }
        }
    }
    let _ = tls::claim_of(data);
});
