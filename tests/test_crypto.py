"""Crypto section: AES-GCM (cryptography and the pure-Python fallback), key derivation, seal/unseal."""
import base64
import hashlib

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st

import tokenomics
import tokenomics.crypto
import tokenomics.errors
from tokenomics.crypto import DecryptionError, PureAESGCM, derive_key, new_aead, seal, unseal

# --- McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", test cases 1-18 -------------
# The spec paper builds its vectors from a few shared values; they are spelled out once here.
_K0_16, _K0_24, _K0_32 = bytes(16), bytes(24), bytes(32)
_K = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
_K_16, _K_24, _K_32 = _K, _K + _K[:8], _K + _K
_IV0 = bytes(12)
_IV12 = bytes.fromhex("cafebabefacedbaddecaf888")
_IV8 = bytes.fromhex("cafebabefacedbad")
_IV60 = bytes.fromhex(
    "9313225df88406e555909c5aff5269aa"
    "6a7a9538534f7da1e4c303d2a318a728"
    "c3c0c95156809539fcf0e2429a6b5254"
    "16aedbf5a0de6a57a637b39b")
_P64 = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a"
    "86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525"
    "b16aedf5aa0de657ba637b391aafd255")
_P60 = _P64[:60]
_A20 = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")

# (case, key, iv, aad, plaintext, ciphertext hex, tag hex)
GCM_SPEC_VECTORS = [
    (1, _K0_16, _IV0, b"", b"", "", "58e2fccefa7e3061367f1d57a4e7455a"),
    (2, _K0_16, _IV0, b"", bytes(16), "0388dace60b6a392f328c2b971b2fe78", "ab6e47d42cec13bdf53a67b21257bddf"),
    (3, _K_16, _IV12, b"", _P64,
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985",
     "4d5c2af327cd64a62cf35abd2ba6fab4"),
    (4, _K_16, _IV12, _A20, _P60,
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
     "5bc94fbc3221a5db94fae95ae7121a47"),
    (5, _K_16, _IV8, _A20, _P60,
     "61353b4c2806934a777ff51fa22a4755699b2a714fcdc6f83766e5f97b6c7423"
     "73806900e49f24b22b097544d4896b424989b5e1ebac0f07c23f4598",
     "3612d2e79e3b0785561be14aaca2fccb"),
    (6, _K_16, _IV60, _A20, _P60,
     "8ce24998625615b603a033aca13fb894be9112a5c3a211a8ba262a3cca7e2ca7"
     "01e4a9a4fba43c90ccdcb281d48c7c6fd62875d2aca417034c34aee5",
     "619cc5aefffe0bfa462af43c1699d050"),
    (7, _K0_24, _IV0, b"", b"", "", "cd33b28ac773f74ba00ed1f312572435"),
    (8, _K0_24, _IV0, b"", bytes(16), "98e7247c07f0fe411c267e4384b0f600", "2ff58d80033927ab8ef4d4587514f0fb"),
    (9, _K_24, _IV12, b"", _P64,
     "3980ca0b3c00e841eb06fac4872a2757859e1ceaa6efd984628593b40ca1e19c"
     "7d773d00c144c525ac619d18c84a3f4718e2448b2fe324d9ccda2710acade256",
     "9924a7c8587336bfb118024db8674a14"),
    (10, _K_24, _IV12, _A20, _P60,
     "3980ca0b3c00e841eb06fac4872a2757859e1ceaa6efd984628593b40ca1e19c"
     "7d773d00c144c525ac619d18c84a3f4718e2448b2fe324d9ccda2710",
     "2519498e80f1478f37ba55bd6d27618c"),
    (11, _K_24, _IV8, _A20, _P60,
     "0f10f599ae14a154ed24b36e25324db8c566632ef2bbb34f8347280fc4507057"
     "fddc29df9a471f75c66541d4d4dad1c9e93a19a58e8b473fa0f062f7",
     "65dcc57fcf623a24094fcca40d3533f8"),
    (12, _K_24, _IV60, _A20, _P60,
     "d27e88681ce3243c4830165a8fdcf9ff1de9a1d8e6b447ef6ef7b79828666e45"
     "81e79012af34ddd9e2f037589b292db3e67c036745fa22e7e9b7373b",
     "dcf566ff291c25bbb8568fc3d376a6d9"),
    (13, _K0_32, _IV0, b"", b"", "", "530f8afbc74536b9a963b4f1c4cb738b"),
    (14, _K0_32, _IV0, b"", bytes(16), "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"),
    (15, _K_32, _IV12, b"", _P64,
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
     "b094dac5d93471bdec1a502270e3cc6c"),
    (16, _K_32, _IV12, _A20, _P60,
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"),
    (17, _K_32, _IV8, _A20, _P60,
     "c3762df1ca787d32ae47c13bf19844cbaf1ae14d0b976afac52ff7d79bba9de0"
     "feb582d33934a4f0954cc2363bc73f7862ac430e64abe499f47c9b1f",
     "3a337dbf46a792c45e454913fe2ea8f2"),
    (18, _K_32, _IV60, _A20, _P60,
     "5a8def2f0c9e53f1f75d7853659e2a20eeb2b22aafde6419a058ab4f6f746bf4"
     "0fc0c3b780f244452da3ebf1c5d82cdea2418997200ef82e44ae7e3f",
     "a44a8266ee1c8eb0c8b5d4cf5ae9f19a"),
]

BACKENDS = {"pure": lambda key: new_aead(key, pure=True), "cryptography": lambda key: new_aead(key)}


@pytest.fixture(params=sorted(BACKENDS))
def make_aead(request):
    return BACKENDS[request.param]


def test_cryptography_is_installed_so_interop_tests_run():
    assert tokenomics.crypto.HAVE_CRYPTOGRAPHY


@pytest.mark.parametrize("case,key,iv,aad,plaintext,ct_hex,tag_hex", GCM_SPEC_VECTORS, ids=[f"case{v[0]}" for v in GCM_SPEC_VECTORS])
def test_gcm_spec_vectors(make_aead, case, key, iv, aad, plaintext, ct_hex, tag_hex):
    aead = make_aead(key)
    expected = bytes.fromhex(ct_hex + tag_hex)
    assert len(expected) == len(plaintext) + 16
    assert aead.encrypt(iv, plaintext, aad) == expected, f"test case {case}"
    assert aead.decrypt(iv, expected, aad) == plaintext, f"test case {case}"


@pytest.mark.parametrize("case,key,iv,aad,plaintext,ct_hex,tag_hex", GCM_SPEC_VECTORS, ids=[f"case{v[0]}" for v in GCM_SPEC_VECTORS])
def test_gcm_spec_vectors_reject_wrong_tag(make_aead, case, key, iv, aad, plaintext, ct_hex, tag_hex):
    bad = bytes.fromhex(ct_hex + tag_hex)
    bad = bad[:-1] + bytes([bad[-1] ^ 0x01])
    with pytest.raises(DecryptionError):
        make_aead(key).decrypt(iv, bad, aad)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def test_every_single_bit_flip_is_detected(make_aead):
    key, nonce, aad = bytes(range(32)), bytes(range(12)), b"token-hash"
    aead = make_aead(key)
    sealed = aead.encrypt(nonce, b'{"models": ["gpt-4o"]}', aad)  # 22 bytes + 16-byte tag
    assert aead.decrypt(nonce, sealed, aad) == b'{"models": ["gpt-4o"]}'
    for bit in range(8 * len(sealed)):  # every ciphertext and tag bit
        with pytest.raises(DecryptionError):
            aead.decrypt(nonce, _flip(sealed, bit), aad)
    for bit in range(8 * len(nonce)):
        with pytest.raises(DecryptionError):
            aead.decrypt(_flip(nonce, bit), sealed, aad)
    for bit in range(8 * len(aad)):
        with pytest.raises(DecryptionError):
            aead.decrypt(nonce, sealed, _flip(aad, bit))


def test_truncated_extended_or_missing_aad_is_detected(make_aead):
    aead = make_aead(bytes(16))
    sealed = aead.encrypt(bytes(12), b"hello world", b"aad")
    for bad_data, bad_aad in [(sealed[:-1], b"aad"), (sealed + b"\x00", b"aad"), (sealed[1:], b"aad"),
                              (sealed, b""), (sealed, None), (sealed, b"aad\x00"), (sealed[:16], b"aad"),
                              (sealed[:15], b"aad"), (b"", b"aad")]:
        with pytest.raises(DecryptionError):
            aead.decrypt(bytes(12), bad_data, bad_aad)


def test_wrong_key_is_detected(make_aead):
    sealed = make_aead(bytes(32)).encrypt(bytes(12), b"secret policy", b"h")
    with pytest.raises(DecryptionError):
        make_aead(bytes(31) + b"\x01").decrypt(bytes(12), sealed, b"h")


_keys = st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
_nonces = st.one_of(st.binary(min_size=12, max_size=12), st.binary(min_size=8, max_size=128))


@settings(max_examples=300, deadline=None)
@given(key=_keys, nonce=_nonces, plaintext=st.binary(max_size=700),
       aad=st.one_of(st.none(), st.binary(max_size=100)))
def test_pure_matches_cryptography_byte_for_byte(key, nonce, plaintext, aad):
    pure, ref = PureAESGCM(key), AESGCM(key)
    ours = pure.encrypt(nonce, plaintext, aad)
    theirs = ref.encrypt(nonce, plaintext, aad)
    assert ours == theirs
    assert ref.decrypt(nonce, ours, aad) == plaintext
    assert pure.decrypt(nonce, theirs, aad) == plaintext


@settings(max_examples=100, deadline=None)
@given(key=_keys, nonce=_nonces, plaintext=st.binary(max_size=200), aad=st.binary(max_size=50),
       data=st.data())
def test_pure_rejects_any_bit_flip_that_cryptography_rejects(key, nonce, plaintext, aad, data):
    sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
    target = data.draw(st.sampled_from(["data", "nonce", "aad"] if aad else ["data", "nonce"]))
    value = {"data": sealed, "nonce": nonce, "aad": aad}[target]
    bit = data.draw(st.integers(0, 8 * len(value) - 1))
    args = {"data": sealed, "nonce": nonce, "aad": aad, target: _flip(value, bit)}
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(args["nonce"], args["data"], args["aad"])
    with pytest.raises(DecryptionError):
        PureAESGCM(key).decrypt(args["nonce"], args["data"], args["aad"])


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 255, 4096, 16 * 1024 - 16, 16 * 1024, 40_003])
def test_pure_matches_cryptography_across_block_and_batch_boundaries(size):
    # 16 KiB - 16 bytes is exactly one batch of counter blocks together with E(J0).
    key, nonce, aad = bytes(range(32)), bytes(range(100, 112)), b"a" * 33
    plaintext = bytes(i * 7 % 256 for i in range(size))
    ours = PureAESGCM(key).encrypt(nonce, plaintext, aad)
    assert ours == AESGCM(key).encrypt(nonce, plaintext, aad)
    assert PureAESGCM(key).decrypt(nonce, ours, aad) == plaintext


def test_pure_accepts_bytes_like_arguments_and_none_aad():
    pure = PureAESGCM(bytearray(32))
    expected = AESGCM(bytes(32)).encrypt(bytes(12), b"abc", b"")
    assert pure.encrypt(bytearray(12), memoryview(b"abc"), None) == expected
    assert pure.encrypt(bytes(12), b"abc", b"") == expected
    assert pure.decrypt(memoryview(bytes(12)), bytearray(expected), None) == b"abc"


@pytest.mark.parametrize("size", [0, 8, 15, 17, 31, 33, 64])
def test_bad_key_size_is_value_error(size):
    with pytest.raises(ValueError):
        PureAESGCM(bytes(size))
    with pytest.raises(ValueError):
        new_aead(bytes(size))


@pytest.mark.parametrize("size", [0, 1, 7, 129])
def test_bad_nonce_size_is_value_error_in_both_backends(make_aead, size):
    aead = make_aead(bytes(32))
    with pytest.raises(ValueError):
        aead.encrypt(bytes(size), b"x", None)
    with pytest.raises(ValueError):
        aead.decrypt(bytes(size), bytes(32), None)


def test_new_aead_picks_cryptography_and_maps_invalid_tag(monkeypatch):
    aead = new_aead(bytes(32))
    assert not isinstance(aead, PureAESGCM)
    sealed = aead.encrypt(bytes(12), b"x", b"y")
    assert sealed == AESGCM(bytes(32)).encrypt(bytes(12), b"x", b"y")
    with pytest.raises(DecryptionError) as info:
        aead.decrypt(bytes(12), _flip(sealed, 0), b"y")
    assert not isinstance(info.value, InvalidTag)
    assert isinstance(info.value, tokenomics.errors.TokenomicsError)


def test_new_aead_pure_or_without_cryptography_is_pure(monkeypatch):
    assert isinstance(new_aead(bytes(32), pure=True), PureAESGCM)
    monkeypatch.setattr(tokenomics.crypto, "HAVE_CRYPTOGRAPHY", False)
    assert isinstance(new_aead(bytes(32)), PureAESGCM)


# --- key derivation ---------------------------------------------------------------------------

_SALT_A, _SALT_B = b"A" * 16, b"B" * 16


def test_scrypt_parameters():
    assert (tokenomics.crypto.SCRYPT_N, tokenomics.crypto.SCRYPT_R, tokenomics.crypto.SCRYPT_P) == (2**15, 8, 1)


@pytest.mark.parametrize("secret", ["00" * 32, "0123456789abcdef" * 4, "0123456789ABCDEF" * 4, "aBcD" * 16])
def test_derive_key_hex_is_the_raw_key_whatever_the_salt(secret):
    assert derive_key(secret, _SALT_A) == bytes.fromhex(secret)
    assert derive_key(secret, b"") == bytes.fromhex(secret)


def test_derive_key_passphrase_is_scrypt_deterministic_per_salt():
    key = derive_key("correct horse battery staple", _SALT_A)
    assert len(key) == 32
    assert key == derive_key("correct horse battery staple", _SALT_A)
    assert key != derive_key("correct horse battery staple", _SALT_B)
    assert key != derive_key("correct horse battery stapler", _SALT_A)
    assert key == hashlib.scrypt(b"correct horse battery staple", salt=_SALT_A, n=2**15, r=8, p=1,
                                 maxmem=64 * 1024 * 1024, dklen=32)


@pytest.mark.parametrize("secret", ["00" * 31 + "0", "00" * 33, "g" + "0" * 63, " " + "0" * 64, "0" * 64 + "\n"])
def test_derive_key_almost_hex_is_a_passphrase(secret):
    key = derive_key(secret, _SALT_A)
    assert len(key) == 32
    assert key == hashlib.scrypt(secret.encode(), salt=_SALT_A, n=2**15, r=8, p=1,
                                 maxmem=64 * 1024 * 1024, dklen=32)


def test_derive_key_non_utf8_environment_value_does_not_crash():
    secret = b"pass\xffword".decode("utf-8", "surrogateescape")  # how os.environ hands it over
    assert derive_key(secret, _SALT_A) == hashlib.scrypt(b"pass\xffword", salt=_SALT_A, n=2**15, r=8, p=1,
                                                         maxmem=64 * 1024 * 1024, dklen=32)


def test_derive_key_empty_secret_is_usage_error():
    with pytest.raises(tokenomics.errors.UsageError):
        derive_key("", _SALT_A)


def test_derive_key_passphrase_needs_a_real_salt():
    with pytest.raises(ValueError):
        derive_key("a passphrase", b"short")


# --- seal / unseal ----------------------------------------------------------------------------

def test_seal_unseal_round_trip(make_aead):
    aead = make_aead(derive_key("11" * 32, b""))
    blob = seal(aead, b'{"budget": 5}', b"hash-1")
    assert isinstance(blob, str)
    raw = base64.b64decode(blob, validate=True)
    assert len(raw) == 12 + len(b'{"budget": 5}') + 16
    assert unseal(aead, blob, b"hash-1") == b'{"budget": 5}'
    assert unseal(aead, seal(aead, b"", b"hash-1"), b"hash-1") == b""


def test_seal_uses_a_fresh_nonce_each_time(make_aead):
    aead = make_aead(bytes(32))
    blobs = {seal(aead, b"same plaintext", b"aad") for _ in range(20)}
    assert len(blobs) == 20
    assert len({base64.b64decode(b)[:12] for b in blobs}) == 20


def test_sealed_blobs_interoperate_between_backends():
    key = bytes(range(32))
    pure, fast = new_aead(key, pure=True), new_aead(key)
    assert unseal(fast, seal(pure, b"policy", b"h"), b"h") == b"policy"
    assert unseal(pure, seal(fast, b"policy", b"h"), b"h") == b"policy"


def test_unseal_with_wrong_key_or_aad_is_decryption_error(make_aead):
    blob = seal(make_aead(derive_key("passphrase one", _SALT_A)), b"policy", b"hash-1")
    with pytest.raises(DecryptionError):
        unseal(make_aead(derive_key("passphrase two", _SALT_A)), blob, b"hash-1")
    with pytest.raises(DecryptionError):
        unseal(make_aead(derive_key("passphrase one", _SALT_B)), blob, b"hash-1")
    with pytest.raises(DecryptionError):
        unseal(make_aead(derive_key("passphrase one", _SALT_A)), blob, b"hash-2")


@pytest.mark.parametrize("blob", [
    "", "!!!!", "not base64 at all", "AAAA=", "é" * 8,
    base64.b64encode(bytes(27)).decode(),  # one byte short of nonce + tag
    base64.b64encode(bytes(28)).decode(),  # nonce + tag of zeros: well-formed, not authentic
])
def test_unseal_malformed_blob_is_decryption_error(make_aead, blob):
    with pytest.raises(DecryptionError):
        unseal(make_aead(bytes(32)), blob, b"aad")


def test_unseal_detects_tampering_in_the_blob(make_aead):
    aead = make_aead(bytes(32))
    raw = base64.b64decode(seal(aead, b"policy text", b"aad"))
    for bit in range(0, 8 * len(raw), 7):
        with pytest.raises(DecryptionError):
            unseal(aead, base64.b64encode(_flip(raw, bit)).decode(), b"aad")
