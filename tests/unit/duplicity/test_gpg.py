"""The pure parts of :mod:`virt_dup.duplicity.gpg`: reading gpg's machine output."""

from __future__ import annotations

import pytest

from virt_dup.duplicity.gpg import Key, imported_fingerprints, parse_keys, parse_version
from virt_dup.errors import VirtDupError

PRIMARY = "00AAB22D47A4BC37F08BCA56431B3ACA148585F7"
SUBKEY = "C893479E91FE52DE1C0249ECE200869812882636"
SIGN_ONLY = "1111111111111111111111111111111111111111"

# gpg 2.2.40 --with-colons --list-keys: a "default default never" key, then a
# key without an encryption subkey ("rsa2048 default"), then a revoked one.
LISTING = f"""\
tru::1:1796185753:0:3:1:5
pub:u:3072:1:431B3ACA148585F7:1796185753:::u:::scESC:::::23::0:
fpr:::::::::{PRIMARY}:
grp:::::::::180EE6F3816A326FCBB98B5D771B74BEED9204A9:
uid:u::::1796185753::29C20E47A28C500D0465935230559D29E996F2C1::virt-dup <root@x>::::::::::0:
sub:u:3072:1:E200869812882636:1796185753::::::e:::::23:
fpr:::::::::{SUBKEY}:
grp:::::::::5998405182769342643B2467104CC3C3E7153514:
pub:u:2048:1:1111111111111111:1796185753:::u:::scSC:::::23::0:
fpr:::::::::{SIGN_ONLY}:
uid:u::::1796185753::AA::sign only <s@x>::::::::::0:
pub:r:2048:1:2222222222222222:1796185753:::u:::sc:::::23::0:
fpr:::::::::{"2" * 40}:
uid:r::::1796185753::BB::revoked <r@x>::::::::::0:
"""


def test_keys_their_subkeys_and_what_they_can_do() -> None:
    keys = parse_keys(LISTING, [PRIMARY])
    assert keys == (
        Key(PRIMARY, (SUBKEY,), ("virt-dup <root@x>",), can_encrypt=True, has_secret=True),
        Key(SIGN_ONLY, (), ("sign only <s@x>",), can_encrypt=False),
        Key("2" * 40, (), (), can_encrypt=False, problem="revoked"),
    )


@pytest.mark.parametrize(
    "key_id",
    [
        PRIMARY,
        PRIMARY.lower(),
        "431B3ACA148585F7",
        "148585F7",
        "0x148585F7",
        SUBKEY,
        "E2008698" + "12882636",
    ],
)
def test_a_key_is_named_by_its_fingerprint_long_or_short_id_or_a_subkey(key_id: str) -> None:
    (key, *_others) = parse_keys(LISTING)
    assert key.matches(key_id)


def test_another_key_id_does_not_name_it() -> None:
    (key, *_others) = parse_keys(LISTING)
    assert not key.matches("148585F8")
    assert not key.matches("431B3ACA")  # a prefix is no key id


def test_the_secret_keys_an_import_took_in() -> None:
    status = f"""\
[GNUPG:] KEY_CONSIDERED {PRIMARY} 0
[GNUPG:] IMPORTED 431B3ACA148585F7 virt-dup <root@x>
[GNUPG:] IMPORT_OK 1 {PRIMARY}
[GNUPG:] IMPORT_OK 17 {PRIMARY}
[GNUPG:] IMPORT_OK 1 {SIGN_ONLY}
[GNUPG:] IMPORT_RES 1 0 1 0 0 0 0 0 0 1 1 0 0 0 0
"""
    assert imported_fingerprints(status) == (PRIMARY,)  # a public key alone restores nothing


def test_version() -> None:
    assert parse_version("gpg (GnuPG) 2.2.40\nlibgcrypt 1.10.1\n") == (2, 2, 40)
    with pytest.raises(VirtDupError, match="cannot tell the gpg version"):
        parse_version("something else")
