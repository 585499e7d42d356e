"""AES-256-GCM for policies at rest (``cryptography`` when installed, else pure Python), key
derivation and sealing."""

import base64
import hashlib
import hmac
import importlib.util
import re
import secrets

from .errors import TokenomicsError, UsageError


# Optional packages are looked up here but imported where they are used: cryptography and
# trustme cost ~15 MB of memory and ~20 ms of start-up that a proxy without encryption or TLS
# should not pay.
HAVE_CRYPTOGRAPHY = importlib.util.find_spec("cryptography") is not None   # fast, audited AES-GCM


# A 64-hex-char secret is a raw 256-bit key; anything else is a passphrase for scrypt.
# scrypt cost: N=2**15, r=8, p=1 needs 128*N*r = 32 MiB and 70-100 ms per derivation (measured),
# paid once when the store is opened, while every guess of an offline attacker pays it too. This
# is the commonly cited 2017 recommendation for interactive use (e.g. Go's x/crypto/scrypt docs).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


_SCRYPT_MAXMEM = 64 * 1024 * 1024  # bytes; 32 MiB of work area plus OpenSSL's own overhead


_SCRYPT_MIN_SALT = 16  # bytes; NIST SP 800-132 asks for at least 128 bits of salt


_HEX_KEY_RE = re.compile(r"[0-9a-fA-F]{64}")


_GCM_NONCE_BYTES = 12  # 96 bits: what seal() uses and what GCM is designed around


_GCM_TAG_BYTES = 16


_GCM_NONCE_RANGE = (8, 128)  # bytes; the lengths cryptography's AESGCM accepts, so both agree


# Counter blocks are encrypted this many at a time (16 KiB of state): large enough that per-round
# Python overhead is amortised, small enough that the big-int state stays in cache (measured:
# 256 -> 10.4, 1024 -> 11.2, 4096 -> 10.9 MB/s on 64 KiB messages).
_AES_BATCH_BLOCKS = 1024


class DecryptionError(TokenomicsError):
    """Ciphertext failed authentication: the key is wrong or the data was altered."""


def _aes_sbox() -> bytes:
    """The AES S-box, computed (inverse in GF(2^8), then the affine map) rather than typed in."""
    exp, log, x = [0] * 255, [0] * 256, 1
    for i in range(255):
        exp[i], log[x] = x, i
        x ^= ((x << 1) ^ (0x11B if x & 0x80 else 0)) & 0xFF  # x *= 3, a generator of GF(2^8)*
    box = bytearray(256)
    for b in range(256):
        inv = exp[(255 - log[b]) % 255] if b else 0
        box[b] = inv ^ 0x63
        for k in range(1, 5):
            box[b] ^= ((inv << k) | (inv >> (8 - k))) & 0xFF
    return bytes(box)


_AES_SBOX = _aes_sbox()


# Lane q of the batched AES state holds byte _AES_LANE_SOURCE[q] of every block: lanes are laid
# out row-major (q = 4*row + column) while a block is column-major (byte = row + 4*column).
_AES_LANE_SOURCE = tuple(row + 4 * col for row in range(4) for col in range(4))


def _aes_round_key_tables(key: bytes) -> list[bytes]:
    """FIPS-197 key expansion. Round key r is returned as a 256-byte bytes.translate() table that
    maps lane number q (0..15) to the round-key byte for that lane, so a batch can spread a round
    key over its lanes with one translate call."""
    nk = len(key) // 4
    rounds = nk + 6
    words = [key[4 * i:4 * i + 4] for i in range(nk)]
    rcon = 1
    for i in range(nk, 4 * (rounds + 1)):
        t = words[i - 1]
        if i % nk == 0:
            t = (t[1:] + t[:1]).translate(_AES_SBOX)
            t = bytes((t[0] ^ rcon, t[1], t[2], t[3]))
            rcon = ((rcon << 1) ^ (0x11B if rcon & 0x80 else 0)) & 0xFF
        elif nk > 6 and i % nk == 4:
            t = t.translate(_AES_SBOX)
        words.append(bytes(a ^ b for a, b in zip(words[i - nk], t)))
    tables = []
    for r in range(rounds + 1):
        round_key = b"".join(words[4 * r:4 * r + 4])
        tables.append(bytes(round_key[i] for i in _AES_LANE_SOURCE) + bytes(240))
    return tables


def _aes_encrypt_batch(key_tables: list[bytes], blocks: bytes) -> bytes:
    """AES-encrypt n concatenated 16-byte blocks (ECB), all n at once.

    Instead of T-tables (one Python-level lookup per byte per round, ~1.3 MB/s), the state is
    transposed into 16 lanes of n bytes, one per state byte, so every step runs in C over all
    blocks together: SubBytes is one bytes.translate, ShiftRows is re-slicing the row regions,
    MixColumns and AddRoundKey are big-int XORs, shifts and masks (xtime on packed bytes).
    """
    n = len(blocks) // 16
    size, row_bits = 16 * n, 32 * n  # state bytes; bits in one row (4 lanes)
    full = (1 << (8 * size)) - 1
    low7 = int.from_bytes(b"\x7f" * size, "big")
    low1 = int.from_bytes(b"\x01" * size, "big")
    lane_ids = b"".join(bytes((q,)) * n for q in range(16))
    frombytes, sbox = int.from_bytes, _AES_SBOX
    n4, n5, n8, n10, n12, n15 = 4 * n, 5 * n, 8 * n, 10 * n, 12 * n, 15 * n
    state = b"".join([blocks[i::16] for i in _AES_LANE_SOURCE])
    state = (frombytes(state, "big") ^ frombytes(lane_ids.translate(key_tables[0]), "big")).to_bytes(size, "big")
    last = len(key_tables) - 1
    for r in range(1, last + 1):
        s = state.translate(sbox)
        # ShiftRows: row k rotates left by k lanes (row 0 is s[:4n], row 1 is s[4n:8n], ...).
        a = frombytes(b"".join((s[:n4], s[n5:n8], s[n4:n5], s[n10:n12], s[n8:n10], s[n15:], s[n12:n15])), "big")
        if r != last:
            # MixColumns per column: out_k = a_k ^ t ^ xtime(a_k ^ a_k+1), t = a_0^a_1^a_2^a_3.
            # Rotating the whole state by one row lines a_k+1 up under a_k for every column.
            d = a ^ (((a << row_bits) & full) | (a >> (3 * row_bits)))
            a ^= d ^ (((d << (2 * row_bits)) & full) | (d >> (2 * row_bits)))
            a ^= ((d & low7) << 1) ^ (((d >> 7) & low1) * 0x1B)
        a ^= frombytes(lane_ids.translate(key_tables[r]), "big")
        state = a.to_bytes(size, "big")
    out = bytearray(size)
    for q, i in enumerate(_AES_LANE_SOURCE):
        out[i::16] = state[q * n:(q + 1) * n]
    return bytes(out)


def _ghash_tables(h: int) -> list[list[int]]:
    """Multiplication by H in GF(2^128) as 16 tables of 256 entries, one per byte position:
    X*H is the XOR of table[p][byte p of X] (multiplication is linear, and each entry is already
    reduced), so one GHASH block costs 16 lookups and no shifting."""
    v, powers = h, []
    for _ in range(128):  # powers[j] = H * x^j, in GCM's reflected bit order
        powers.append(v)
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    tables = []
    for p in range(16):
        t = [0] * 256
        for k in range(8):
            t[0x80 >> k] = powers[8 * p + k]
        for b in range(1, 256):
            low = b & -b
            if b != low:
                t[b] = t[b ^ low] ^ t[low]
        tables.append(t)
    return tables


def _ghash(tables: list[list[int]], blocks: bytes) -> int:
    """GHASH_H over data already padded to whole 16-byte blocks; returns the 128-bit value."""
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = tables
    frombytes, y = int.from_bytes, 0
    for i in range(0, len(blocks), 16):
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = (
            y ^ frombytes(blocks[i:i + 16], "big")).to_bytes(16, "big")
        y = (t0[b0] ^ t1[b1] ^ t2[b2] ^ t3[b3] ^ t4[b4] ^ t5[b5] ^ t6[b6] ^ t7[b7]
             ^ t8[b8] ^ t9[b9] ^ t10[b10] ^ t11[b11] ^ t12[b12] ^ t13[b13] ^ t14[b14] ^ t15[b15])
    return y


def _pad16(data: bytes) -> bytes:
    return data + bytes(-len(data) % 16)


def _xor_bytes(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


class PureAESGCM:
    """AES-GCM (NIST SP 800-38D) in pure Python, used when `cryptography` is not installed.

    Same API and same bytes as cryptography's AESGCM: encrypt() returns ciphertext || 16-byte tag,
    decrypt() raises DecryptionError on a bad tag. Nonces of 8..128 bytes (12 is the fast path).
    Not constant-time apart from the tag comparison: fine for encrypting a local file at rest,
    not for serving as an oracle to a network attacker.
    """

    __slots__ = ("_key_tables", "_ghash_tables")

    def __init__(self, key: bytes):
        key = bytes(key)
        if len(key) not in (16, 24, 32):
            raise ValueError("AES-GCM key must be 128, 192 or 256 bits (16, 24 or 32 bytes)")
        self._key_tables = _aes_round_key_tables(key)
        h = _aes_encrypt_batch(self._key_tables, bytes(16))
        self._ghash_tables = _ghash_tables(int.from_bytes(h, "big"))

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        nonce, data, aad = bytes(nonce), bytes(data), bytes(associated_data or b"")
        self._check_nonce(nonce)
        keystream = self._keystream(nonce, len(data))
        ciphertext = _xor_bytes(data, keystream[16:16 + len(data)])
        return ciphertext + self._tag(keystream[:16], aad, ciphertext)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        nonce, data, aad = bytes(nonce), bytes(data), bytes(associated_data or b"")
        self._check_nonce(nonce)
        if len(data) < _GCM_TAG_BYTES:
            raise DecryptionError("decryption failed: the data is too short to hold a tag")
        ciphertext, tag = data[:-_GCM_TAG_BYTES], data[-_GCM_TAG_BYTES:]
        keystream = self._keystream(nonce, len(ciphertext))
        if not hmac.compare_digest(tag, self._tag(keystream[:16], aad, ciphertext)):
            raise DecryptionError("decryption failed: the key is wrong or the data was altered")
        return _xor_bytes(ciphertext, keystream[16:16 + len(ciphertext)])

    @staticmethod
    def _check_nonce(nonce: bytes) -> None:
        if not _GCM_NONCE_RANGE[0] <= len(nonce) <= _GCM_NONCE_RANGE[1]:
            raise ValueError("AES-GCM nonce must be between 8 and 128 bytes")

    def _keystream(self, nonce: bytes, length: int) -> bytes:
        """E(J0) followed by E(inc32(J0)), E(inc32^2(J0)), ... covering `length` bytes."""
        if len(nonce) == _GCM_NONCE_BYTES:
            j0 = nonce + b"\x00\x00\x00\x01"
        else:  # SP 800-38D: J0 = GHASH(IV padded || 0^64 || [len(IV) in bits]_64)
            j0 = _ghash(self._ghash_tables, _pad16(nonce) + (8 * len(nonce)).to_bytes(16, "big")).to_bytes(16, "big")
        prefix, counter = j0[:12], int.from_bytes(j0[12:], "big")
        total = 1 + (length + 15) // 16
        parts = []
        for start in range(0, total, _AES_BATCH_BLOCKS):
            counters = b"".join(prefix + ((counter + i) & 0xFFFFFFFF).to_bytes(4, "big")
                                for i in range(start, min(total, start + _AES_BATCH_BLOCKS)))
            parts.append(_aes_encrypt_batch(self._key_tables, counters))
        return b"".join(parts)

    def _tag(self, encrypted_j0: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        lengths = ((8 * len(aad)) << 64 | (8 * len(ciphertext))).to_bytes(16, "big")
        s = _ghash(self._ghash_tables, _pad16(aad) + _pad16(ciphertext) + lengths)
        return (s ^ int.from_bytes(encrypted_j0, "big")).to_bytes(16, "big")


class _CryptographyAESGCM:
    """cryptography's AESGCM with its InvalidTag mapped to DecryptionError, so callers catch one
    exception whichever backend is in use."""

    __slots__ = ("_aead", "_invalid_tag")

    def __init__(self, key: bytes):
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self._aead, self._invalid_tag = AESGCM(bytes(key)), InvalidTag

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self._aead.encrypt(nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        try:
            return self._aead.decrypt(nonce, data, associated_data)
        except self._invalid_tag:
            raise DecryptionError("decryption failed: the key is wrong or the data was altered") from None


def new_aead(key: bytes, *, pure: bool = False) -> PureAESGCM | _CryptographyAESGCM:
    """An AES-GCM object with encrypt(nonce, data, aad) / decrypt(nonce, data, aad): cryptography's
    when it is installed (and `pure` is false), else the bundled pure-Python one. Both produce the
    same bytes and raise DecryptionError on a bad tag."""
    if HAVE_CRYPTOGRAPHY and not pure:
        return _CryptographyAESGCM(key)
    return PureAESGCM(key)


def derive_key(secret: str, salt: bytes) -> bytes:
    """The 32-byte key for `secret`: 64 hex chars are the key itself; anything else is a passphrase
    stretched with scrypt over the store's salt (same secret and salt -> same key)."""
    if not secret:
        raise UsageError("the encryption key is empty: set it to 64 hex characters (a raw 256-bit key) or a passphrase")
    if _HEX_KEY_RE.fullmatch(secret):
        return bytes.fromhex(secret)
    if len(salt) < _SCRYPT_MIN_SALT:
        raise ValueError(f"scrypt salt must be at least {_SCRYPT_MIN_SALT} bytes")
    # surrogateescape: an environment value that is not valid UTF-8 reaches us with its raw bytes
    # escaped; this gives those bytes back instead of raising.
    return hashlib.scrypt(secret.encode("utf-8", "surrogateescape"), salt=bytes(salt),
                          n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_SCRYPT_MAXMEM, dklen=32)


def seal(aead, plaintext: bytes, aad: bytes) -> str:
    """Encrypt under a fresh random 96-bit nonce; returns base64 of nonce || ciphertext || tag."""
    nonce = secrets.token_bytes(_GCM_NONCE_BYTES)
    return base64.b64encode(nonce + aead.encrypt(nonce, plaintext, aad)).decode("ascii")


def unseal(aead, blob: str, aad: bytes) -> bytes:
    """Inverse of seal(). Anything that is not an authentic sealed blob for this key and `aad`
    (bad base64, too short, wrong key, altered bytes) raises DecryptionError."""
    try:
        raw = base64.b64decode(blob, validate=True)
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        raise DecryptionError("decryption failed: the stored ciphertext is not valid base64") from None
    if len(raw) < _GCM_NONCE_BYTES + _GCM_TAG_BYTES:
        raise DecryptionError("decryption failed: the stored ciphertext is truncated")
    return aead.decrypt(raw[:_GCM_NONCE_BYTES], raw[_GCM_NONCE_BYTES:], aad)
