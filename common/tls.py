"""TLS for the gRPC channel: credentials for both sides, and `fl-certs`, which makes a deployment's
certificate authority, the server's certificate and one certificate per client.

With `--tls-client-ca` the server asks every client for a certificate signed by that CA (mutual TLS)
and takes the certificate's common name as the client's identity: a client can only join, fetch and
submit as the id in its certificate.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from pathlib import Path

import grpc


class TLSError(ValueError):
    pass


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSError(f"cannot read {what} {path}: {e.strerror}; make certificates with fl-certs") from None


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
                                       root_certificates=_read(client_ca, "client CA certificate"),
                                       require_client_auth=client_ca is not None)


def channel_credentials(ca: str, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    if (cert is None) != (key is None):
        raise TLSError("give both --tls-cert and --tls-key (a client certificate and its key), or neither")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "CA certificate"),
                                        private_key=_read(key, "TLS key"),
                                        certificate_chain=_read(cert, "TLS certificate"))


def wants_plaintext(insecure: bool, tls_flags_given: bool, tls_complete: bool, missing: str) -> bool:
    """Plaintext is never the silent default: True for --insecure without TLS flags, False when the
    TLS flags are complete; anything else raises TLSError (`missing` says which flags to pass)."""
    if insecure:
        if tls_flags_given:
            raise TLSError("--insecure and TLS flags together; choose one")
        return True
    if not tls_complete:
        raise TLSError(f"{missing}, or --insecure for plaintext on localhost or a trusted network")
    return False


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client's verified certificate, or None without mutual TLS."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None


# --- fl-certs ------------------------------------------------------------------------------------------

def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def make_certificates(out: Path, server_names: list[str], client_ids: list[str], days: int = 365) -> list[Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgrpc"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("fedgrpc CA")).issuer_name(name("fedgrpc CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    written = []

    def issue(stem: str, common_name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(out / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write(out / f"{stem}.key", key_pem(key), private=True)
        written.extend([out / f"{stem}.pem", out / f"{stem}.key"])

    sans: list[x509.GeneralName] = []
    for server_name in server_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(server_name)))
        except ValueError:
            sans.append(x509.DNSName(server_name))
    issue("server", server_names[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    for client_id in client_ids:
        issue(f"client-{client_id}", client_id, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", key_pem(ca_key), private=True)
    return [out / "ca.pem", out / "ca.key", *written]


def certs_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-certs", description="Make a CA, a server certificate and client "
                                     "certificates for a federation (ECDSA P-256, signed by the new CA).")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the PEM files into")
    parser.add_argument("--server-name", action="append", default=None, metavar="NAME",
                        help="a DNS name or IP address clients use to reach the server (repeatable; default "
                             "localhost and 127.0.0.1)")
    parser.add_argument("--clients", nargs="*", default=[], metavar="ID", help="client ids: one certificate each")
    parser.add_argument("--days", type=int, default=365, help="validity")
    args = parser.parse_args(argv)
    try:
        written = make_certificates(args.out, args.server_name or ["localhost", "127.0.0.1"], args.clients, args.days)
    except OSError as e:
        print(f"fl-certs: error: cannot write into {args.out} ({e.strerror})", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print("keep ca.key offline; give the server server.pem/.key and ca.pem, each client its client-ID.pem/.key "
          "and ca.pem", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(certs_main())
