"""The local CA and server certificate for the HTTPS listener (trustme), or the user's own."""

import datetime as _dt
import os
import ssl

from .config import Config
from .errors import UsageError
from .util import HAVE_TRUSTME, log, write_private


CA_DAYS = 3650          # the local CA outlives many server certificates


SERVER_CERT_DAYS = 365  # browsers and SDKs reject longer-lived leaf certificates


def cert_dir(config: Config) -> str:
    return config.server.tls.cert_dir or os.path.join(config.dir, "certs")


def ensure_local_ca(config: Config) -> tuple[str, str, str]:
    """Create (once) and reuse {dir}/certs/{ca.crt, ca.key, server.crt, server.key}; keys 0600.
    Returns (ca.crt, server.crt, server.key) paths."""
    folder = cert_dir(config)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    paths = {name: os.path.join(folder, name) for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    if all(os.path.isfile(p) for p in paths.values()) and not _expires_soon(paths["server.crt"]):
        return paths["ca.crt"], paths["server.crt"], paths["server.key"]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    now = _dt.datetime.now(_dt.timezone.utc)
    if os.path.isfile(paths["ca.crt"]) and os.path.isfile(paths["ca.key"]):
        with open(paths["ca.crt"], "rb") as fh:
            ca_pem = fh.read()
        with open(paths["ca.key"], "rb") as fh:
            ca_key_pem = fh.read()
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tokenomics"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "tokenomics local CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(hours=1))
                   .not_valid_after(now + _dt.timedelta(days=CA_DAYS))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .sign(key, hashes.SHA256()))
        ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        ca_key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
        write_private(paths["ca.key"], ca_key_pem)
        write_private(paths["ca.crt"], ca_pem)
        os.chmod(paths["ca.crt"], 0o644)
    import trustme
    ca = trustme.CA.from_pem(ca_pem, ca_key_pem)
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost",
                         not_after=now + _dt.timedelta(days=SERVER_CERT_DAYS))
    write_private(paths["server.key"], leaf.private_key_pem.bytes())
    write_private(paths["server.crt"], b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    os.chmod(paths["server.crt"], 0o644)
    return paths["ca.crt"], paths["server.crt"], paths["server.key"]


CERT_RENEW_DAYS = 30    # a server certificate this close to expiry is reissued from the local CA


def _expires_soon(cert_path: str) -> bool:
    """Whether a PEM certificate expires within CERT_RENEW_DAYS (or cannot be read)."""
    try:
        from cryptography import x509
        with open(cert_path, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        not_after = cert.not_valid_after_utc
    except Exception:
        return True
    return not_after - _dt.datetime.now(_dt.timezone.utc) < _dt.timedelta(days=CERT_RENEW_DAYS)


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """The HTTPS listener's context, or None (with one warning) when it cannot be built."""
    tls = config.server.tls
    if tls.cert_file or tls.key_file:
        if not (tls.cert_file and tls.key_file):
            raise UsageError("config: server.tls: cert_file and key_file must be given together")
        cert, key = tls.cert_file, tls.key_file
    elif not tls.auto_gen:
        raise UsageError("config: server.tls: set cert_file and key_file, or auto_gen: true, or disable TLS "
                         "with --no-tls / https_port: 0")
    elif not HAVE_TRUSTME:
        log.warning("HTTPS is off: the TLS extra is not installed. Install it with "
                    "`pip install 'tokenomics[tls]'`, or pass --no-tls to silence this warning")
        return None
    else:
        _, cert, key = ensure_local_ca(config)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"config: server.tls: cannot load {cert} / {key}: {exc}") from None
    return ctx
