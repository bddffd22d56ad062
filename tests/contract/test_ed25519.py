"""contract.ed25519: verification through libcrypto (ctypes) and through cryptography agree with
RFC 8032 and with each other, and PEM public keys are parsed strictly."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from dataclasses import FrozenInstanceError

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract import SignatureError, ed25519, key_id, load_public_key
from contract.ed25519 import VerifyKey, as_verify_key, backend_name
from tests.conftest import run_python

# The order of the Ed25519 base point: a signature's S must be below it (RFC 8032 5.1.7).
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493

# RFC 8032 section 7.1: (name, secret key, public key, message, signature), all hex.
RFC8032 = [
    (
        "TEST 1",
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "TEST 2",
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "TEST 3",
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    (
        "TEST 1024",
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4"
        "eb98fa6e264bf09efe12ee50f8f54e9f77b1e355f6c50544e23fb1433ddf"
        "73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a"
        "1b270b20329d658675fc6ea534e0810a4432826bf58c941efb65d57a338b"
        "bd2e26640f89ffbc1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b"
        "199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b3b310da9"
        "03401aa62100ab5d1a36553e06203b33890cc9b832f79ef80560ccb9a39c"
        "e767967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc10"
        "3b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204ed3455c68c83"
        "f4a41da4af2b74ef5c53f1d8ac70bdcb7ed185ce81bd84359d44254d9562"
        "9e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a"
        "2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24554119a831a9aad6"
        "079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f27088d78b7e883c"
        "8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e694"
        "85bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b0707e0"
        "917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
        "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255d"
        "c51addd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2"
        "af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e0"
        "56a9b47acdb751fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301"
        "651339e22904cc8c42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c"
        "4b4c4525004aa06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f672451"
        "7b65e614ad6808d6f6ee34dff7310fdc82aebfd904b01e1dc54b2927094b"
        "2db68d6f903b68401adebf5a7e08d78ff4ef5d63653a65040cf9bfd4aca7"
        "984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e2ab4"
        "7b57f7f7276cd419c17a3ca8e1b939ae49e488acba6b965610b5480109c8"
        "b17b80e1b7b750dfc7598d5d5011fd2dcc5600a32ef5b52a1ecc820e308a"
        "a342721aac0943bf6686b64b2579376504ccc493d97e6aed3fb0f9cd71a4"
        "3dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5fb93246f6b111"
        "6398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b50d334ba7"
        "7c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef13695"
        "46868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
        "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86ab"
        "a41c0618983f8741c5ef68d3a101e8a3b8cac60c905c15fc910840b94c00"
        "a0b9d0",
        "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
        "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
    ),
    (
        "TEST SHA(abc)",
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
        "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
]


@pytest.fixture(params=ed25519.BACKENDS)
def backend(request, monkeypatch) -> Iterator[str]:
    """Force one backend for the test (each test runs once per backend)."""
    monkeypatch.setenv(ed25519.BACKEND_ENV, request.param)
    ed25519._reset_backend()
    yield request.param
    ed25519._reset_backend()


@pytest.fixture
def fresh_choice(monkeypatch) -> Iterator[None]:
    monkeypatch.delenv(ed25519.BACKEND_ENV, raising=False)
    ed25519._reset_backend()
    yield
    ed25519._reset_backend()


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def pem_of(public_key) -> bytes:  # noqa: ANN001 - any cryptography public key
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---- RFC 8032 and random keys, on both backends ---------------------------------------------
@pytest.mark.parametrize("vector", RFC8032, ids=[v[0] for v in RFC8032])
def test_rfc8032_vectors(backend: str, vector) -> None:  # noqa: ANN001
    secret, public, message, signature = (bytes.fromhex(v) for v in vector[1:])
    # The vectors were typed in: cryptography's deterministic signing must reproduce them.
    signer = Ed25519PrivateKey.from_private_bytes(secret)
    assert raw_public(signer) == public
    assert signer.sign(message) == signature

    key = VerifyKey.from_raw(public)
    assert key.verify(signature, message) is True
    assert backend_name() == backend
    assert key.verify(flip_bit(signature, 0), message) is False
    assert key.verify(signature, message + b"\x00") is False


def test_random_keys_and_one_bit_flips(backend: str) -> None:
    rng = random.Random(8032)
    for _ in range(200):
        signer = Ed25519PrivateKey.generate()
        message = rng.randbytes(rng.randrange(0, 600))
        signature = signer.sign(message)
        public = raw_public(signer)
        key = VerifyKey.from_raw(public)
        assert key.verify(signature, message) is True
        assert key.verify(flip_bit(signature, rng.randrange(512)), message) is False
        if message:
            assert (
                key.verify(signature, flip_bit(message, rng.randrange(len(message) * 8))) is False
            )
        flipped_key = VerifyKey.from_raw(flip_bit(public, rng.randrange(256)))
        assert flipped_key.verify(signature, message) is False
    assert backend_name() == backend


@pytest.mark.parametrize("length", [0, 1, 63, 65, 128])
def test_wrong_signature_length_is_false(backend: str, length: int) -> None:
    signer = Ed25519PrivateKey.generate()
    signature = signer.sign(b"msg")
    key = VerifyKey.from_raw(raw_public(signer))
    padded = (signature * 2)[:length]
    assert key.verify(padded, b"msg") is False
    assert key.verify(bytes(64), b"msg") is False


def test_signature_with_s_not_below_group_order_is_rejected(backend: str) -> None:
    signer = Ed25519PrivateKey.generate()
    message = b"malleability"
    signature = signer.sign(message)
    key = VerifyKey.from_raw(raw_public(signer))
    assert key.verify(signature, message) is True
    s = int.from_bytes(signature[32:], "little")
    malleated = signature[:32] + (s + GROUP_ORDER).to_bytes(32, "little")
    assert key.verify(malleated, message) is False


def test_verify_accepts_bytes_like(backend: str) -> None:
    signer = Ed25519PrivateKey.generate()
    signature = signer.sign(b"abc")
    key = VerifyKey.from_raw(bytearray(raw_public(signer)))
    assert key.verify(bytearray(signature), memoryview(b"abc")) is True


# ---- keys -----------------------------------------------------------------------------------
def test_pem_round_trips_with_cryptography() -> None:
    for _ in range(20):
        public_key = Ed25519PrivateKey.generate().public_key()
        pem = pem_of(public_key)
        key = VerifyKey.from_pem(pem)
        assert key.raw == public_key.public_bytes_raw()
        assert key.to_pem() == pem
        assert VerifyKey.from_pem(pem.decode("ascii")) == key
        assert load_public_key(pem) == key
        assert VerifyKey.from_pem(pem.replace(b"\n", b"\r\n")) == key


@pytest.mark.parametrize(
    ("make", "algorithm"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "EC"),
    ],
    ids=["rsa", "ec-p256"],
)
def test_other_key_types_are_refused(make, algorithm: str) -> None:  # noqa: ANN001
    pem = pem_of(make().public_key())
    with pytest.raises(SignatureError, match=f"not an Ed25519 public key .*{algorithm}"):
        VerifyKey.from_pem(pem)
    with pytest.raises(SignatureError, match="not an Ed25519 public key"):
        load_public_key(pem)


def _ed25519_pem() -> bytes:
    return pem_of(Ed25519PrivateKey.generate().public_key())


def _with_der(der: bytes) -> bytes:
    body = base64.b64encode(der).decode("ascii")
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n".encode("ascii")


def _der(pem: bytes) -> bytes:
    return base64.b64decode(b"".join(pem.splitlines()[1:-1]))


@pytest.mark.parametrize(
    "garbage",
    [
        lambda: b"",
        lambda: b"hello",
        lambda: "é".encode(),
        lambda: b"-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n",
        lambda: b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
        lambda: _ed25519_pem()[:-30],  # END line cut off
        lambda: _ed25519_pem() + _ed25519_pem(),  # two blocks
        lambda: b"comment\n" + _ed25519_pem(),  # text outside the block
        lambda: _with_der(_der(_ed25519_pem()) + b"\x00"),  # trailing byte
        lambda: _with_der(_der(_ed25519_pem())[:-1]),  # key one byte short
        lambda: _with_der(bytes(44)),
        lambda: _ed25519_pem().replace(b"PUBLIC KEY", b"RSA PUBLIC KEY"),
        lambda: Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        lambda: b"A" * (ed25519.MAX_PEM_BYTES + 1),
    ],
)
def test_garbage_pem_is_refused(garbage) -> None:  # noqa: ANN001
    with pytest.raises(SignatureError, match="not an? (PEM|Ed25519) public key"):
        VerifyKey.from_pem(garbage())


def test_from_raw_needs_exactly_32_bytes() -> None:
    for size in (0, 31, 33, 64):
        with pytest.raises(SignatureError, match="32 raw bytes"):
            VerifyKey.from_raw(bytes(size))
    with pytest.raises(SignatureError):
        VerifyKey.from_raw("00" * 32)  # type: ignore[arg-type]


def test_verify_key_is_an_immutable_value() -> None:
    raw = raw_public(Ed25519PrivateKey.generate())
    a, b = VerifyKey.from_raw(raw), VerifyKey.from_raw(bytearray(raw))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != VerifyKey.from_raw(raw_public(Ed25519PrivateKey.generate()))
    assert a != raw  # a key is not its bytes
    with pytest.raises(FrozenInstanceError):
        a.raw = bytes(32)  # type: ignore[misc]
    assert raw.hex() in repr(a)


def test_as_verify_key_normalises_every_accepted_form() -> None:
    public_key = Ed25519PrivateKey.generate().public_key()
    raw = public_key.public_bytes_raw()
    key = VerifyKey.from_raw(raw)
    assert as_verify_key(key) is key
    assert as_verify_key(public_key) == key
    assert as_verify_key(raw) == key
    assert key_id(public_key) == key_id(key) == key_id(raw)
    # Equal to the cryptography key it came from, in both directions (as load_public_key's
    # result used to be).
    assert key == public_key and public_key == key
    assert key != Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SignatureError):
        as_verify_key(raw[:31])
    with pytest.raises(TypeError, match="Ed25519 public key"):
        as_verify_key(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key())
    with pytest.raises(TypeError):
        as_verify_key(raw.hex())


# ---- backend choice -------------------------------------------------------------------------
def test_default_backend_is_openssl(fresh_choice) -> None:  # noqa: ANN001
    assert backend_name() == "openssl"


def test_unusable_openssl_falls_back_to_cryptography(fresh_choice, monkeypatch) -> None:  # noqa: ANN001
    def broken() -> None:
        raise OSError("libcrypto not found")

    monkeypatch.setitem(ed25519._LOADERS, "openssl", broken)
    assert backend_name() == "cryptography"


def test_openssl_failing_self_check_falls_back(fresh_choice, monkeypatch) -> None:  # noqa: ANN001
    class Lenient:
        name = "openssl"

        def verify(self, key: bytes, signature: bytes, message: bytes) -> bool:
            return True  # accepts the flipped known-answer signature too

    monkeypatch.setitem(ed25519._LOADERS, "openssl", Lenient)
    assert backend_name() == "cryptography"


def test_forced_backend_must_be_usable(fresh_choice, monkeypatch) -> None:  # noqa: ANN001
    def broken() -> None:
        raise OSError("libcrypto not found")

    monkeypatch.setitem(ed25519._LOADERS, "openssl", broken)
    monkeypatch.setenv(ed25519.BACKEND_ENV, "openssl")
    with pytest.raises(RuntimeError, match="'openssl' cannot be loaded: libcrypto not found"):
        backend_name()
    ed25519._reset_backend()
    monkeypatch.setenv(ed25519.BACKEND_ENV, "nacl")
    with pytest.raises(RuntimeError, match="must be one of openssl, cryptography"):
        backend_name()


PROBE = """
import json, sys
import contract, contract.envelope, contract.manifest, contract.trust
from contract.ed25519 import VerifyKey, backend_name
key = VerifyKey.from_raw(bytes.fromhex(sys.argv[1]))
ok = key.verify(bytes.fromhex(sys.argv[2]), b"")
print(json.dumps({"ok": ok, "backend": backend_name(),
                  "cryptography": "cryptography" in sys.modules}))
"""


def test_contract_verifies_without_importing_cryptography() -> None:
    out = run_python(PROBE, RFC8032[0][2], RFC8032[0][4], unset=(ed25519.BACKEND_ENV,))
    assert json.loads(out.stdout) == {"ok": True, "backend": "openssl", "cryptography": False}
