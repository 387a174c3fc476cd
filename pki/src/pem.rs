//! PEM encoding (decoding is done with `rustls_pki_types::pem`).

use base64::Engine as _;
use zeroize::Zeroize;

/// Encodes `der` as a PEM block with `label`, 64 characters a line, LF line endings.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let mut b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk boundary is a char boundary.
        out.extend(line.iter().map(|b| char::from(*b)));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    // The intermediate base64 may encode a private key.
    b64.zeroize();
    out
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    #[test]
    fn round_trip() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = super::encode("CERTIFICATE", &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect("decode");
        assert_eq!(back.as_ref(), der.as_slice());
    }
}
