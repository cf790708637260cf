"""Signed backups and ``restore: require_signature`` against real duplicity 3.2.1 and gpg.

The attacker of these tests can write to the backend and knows the public key
the backups are encrypted to, not the secret sign key.  To save writing a
manifest by hand, the attacker here starts from a plain duplicity restore of
the genuine set (made with the test's key, no virt-dup code); a real attacker
writes the same few files from scratch.  The forged disk carries a pattern of
the attacker's and matching SHA-256 sums, so that a restore that does not
check signatures takes it as genuine -- which the first test shows.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness.backups import VENV_BIN, BackupEnvironment, fill, sha256
from harness.domains import MIB

pytestmark = pytest.mark.integration

SIZE = 64 * MIB
FORGED = 0xEE  # the attacker's pattern
GENUINE = 0x5A


def configured(environment: BackupEnvironment, *, signed: bool) -> BackupEnvironment:
    """The environment with its virt-dup.yml signing backups and requiring signatures
    on restore (``signed``), or as the harness writes it (neither)."""
    text = (environment.root / "virt-dup.yml").read_text()  # as the harness wrote it
    keys_line = f"  keys: [{environment.fingerprint}]\n"
    assert keys_line in text
    if signed:
        text = text.replace(keys_line, f"{keys_line}  sign_key: {environment.fingerprint}\n")
        text += "restore:\n  require_signature: true\n"
        config = environment.root / "virt-dup-signed.yml"
    else:
        config = environment.root / "virt-dup-unsigned.yml"
    config.write_text(text)
    return dataclasses.replace(environment, config=config)


@pytest.fixture
def environment(tmp_path: Path, gpg_home) -> BackupEnvironment:
    return configured(
        BackupEnvironment.create(tmp_path, gpg_home.path, gpg_home.fingerprint), signed=True
    )


def backed_up_domain(make_domain, environment: BackupEnvironment) -> tuple[str, Path]:
    """A shut-off domain with one single-file disk holding a pattern, backed up once by
    ``virt-dup run`` (signed); returns the job and the image."""
    vm = make_domain(running=False, size=SIZE, chain=("vm",))
    (image,) = vm.images["vda"]
    fill(image, GENUINE, 3 * MIB, 2 * MIB)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    environment.virt_dup("run", job)
    return job, image


def plain_duplicity(environment: BackupEnvironment, *arguments: str) -> None:
    """duplicity as the attacker runs it (no virt-dup code), with the test's GnuPG home."""
    variables = {
        **os.environ,
        "GNUPGHOME": str(environment.gnupg_home),
        "PASSPHRASE": "",
        "SIGN_PASSPHRASE": "",
    }
    finished = subprocess.run(
        [
            str(VENV_BIN / "duplicity"),
            *arguments,
            "--archive-dir",
            str(environment.root / "attacker-cache"),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=variables,
    )
    assert finished.returncode == 0, f"duplicity {arguments}:\n{finished.stderr}"


def forge_set(environment: BackupEnvironment, job: str, image: Path, *how: str) -> tuple[str, str]:
    """Replace the job's whole collection with a set of the attacker's: the same
    files, the disk carrying :data:`FORGED`, checksums to match; made by plain
    duplicity with ``how`` (its encryption/signing options).  Returns the forged
    image's SHA-256 and the forged set's backup id."""
    tree = environment.root / "attacker-tree"
    environment.restore_all(job, tree)
    forged_image = tree / os.fspath(image).lstrip("/")
    genuine_digest = sha256(forged_image)
    fill(forged_image, FORGED, 3 * MIB, 2 * MIB)
    forged_digest = sha256(forged_image)
    (folder,) = tree.rglob("manifest.json")
    for name in ("manifest.json", "SHA256SUMS"):
        path = folder.parent / name
        text = path.read_text()
        assert genuine_digest in text
        path.write_text(text.replace(genuine_digest, forged_digest))
    collection = environment.backend / job
    shutil.rmtree(collection)
    plain_duplicity(environment, "full", *how, str(tree), environment.job_url(job))
    (manifest,) = collection.glob("duplicity-full.*.manifest*")
    return forged_digest, manifest.name.split(".")[1]


def refusal(finished: subprocess.CompletedProcess[str]) -> str:
    assert finished.returncode != 0, finished.stdout
    lines = [line for line in finished.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, finished.stderr
    return lines[0]


def test_a_signed_backup_restores_byte_for_byte_with_require_signature(
    make_domain, environment, tmp_path
) -> None:
    job, image = backed_up_domain(make_domain, environment)
    names = [path.name for path in (environment.backend / job).iterdir()]
    assert names and all(".gpg" in name for name in names), names

    target = tmp_path / "restored"
    environment.virt_dup("restore", job, "--target-dir", str(target))
    assert sha256(target / "vda" / image.name) == sha256(image)
    finished = environment.virt_dup("verify", job, "--scratch-dir", str(tmp_path / "scratch"))
    assert "verified backup" in finished.stdout


def test_an_unsigned_set_encrypted_to_the_same_key_is_refused(
    make_domain, environment, tmp_path
) -> None:
    job, image = backed_up_domain(make_domain, environment)
    forged_digest, forged_id = forge_set(
        environment, job, image, "--encrypt-key", environment.fingerprint
    )

    # The attack: without signatures the forged set restores as if genuine.
    unsigned = configured(environment, signed=False)
    taken = tmp_path / "taken"
    unsigned.virt_dup("restore", job, "--target-dir", str(taken))
    assert sha256(taken / "vda" / image.name) == forged_digest

    # With sign_key + require_signature it is refused, and nothing is written.
    # (The metadata the restore above cached was read unchecked: not trusted.)
    target = tmp_path / "refused"
    line = refusal(environment.virt_dup("restore", job, "--target-dir", str(target), check=False))
    assert f"job {job}: backup {forged_id} on {environment.job_url(job)}" in line
    assert "the signature did not verify: a volume carries no valid signature" in line
    assert environment.fingerprint in line
    assert not target.exists()

    scratch = tmp_path / "scratch"
    line = refusal(environment.virt_dup("verify", job, "--scratch-dir", str(scratch), check=False))
    assert "FAILED" in line and "the signature did not verify" in line
    assert list(scratch.iterdir()) == []


def test_an_unencrypted_set_is_refused_before_it_is_read(
    make_domain, environment, tmp_path
) -> None:
    # duplicity checks signatures only of what it decrypts: a plain set would
    # pass --sign-key unchecked.
    job, image = backed_up_domain(make_domain, environment)
    forge_set(environment, job, image, "--no-encryption")

    target = tmp_path / "refused"
    line = refusal(environment.virt_dup("restore", job, "--target-dir", str(target), check=False))
    assert f"job {job} on {environment.job_url(job)}: duplicity-full" in line
    assert "and 2 more are not encrypted, so no signature can verify" in line
    assert not target.exists()


def test_a_set_signed_by_another_key_is_refused(make_domain, environment, tmp_path) -> None:
    job, image = backed_up_domain(make_domain, environment)
    # The attacker's own key, in the restoring host's keyring even (the worst case:
    # its signature is good, only not by the sign key).
    subprocess.run(
        ["gpg", "--homedir", str(environment.gnupg_home), "--batch", "--passphrase", "",
         "--quick-gen-key", "attacker <a@example.invalid>", "default", "default", "never"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    listed = subprocess.run(
        ["gpg", "--homedir", str(environment.gnupg_home), "--with-colons", "--list-keys",
         "attacker"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    other = next(line.split(":")[9] for line in listed.splitlines() if line.startswith("fpr"))
    forge_set(
        environment, job, image, "--encrypt-key", environment.fingerprint, "--sign-key", other
    )

    target = tmp_path / "refused"
    line = refusal(environment.virt_dup("restore", job, "--target-dir", str(target), check=False))
    assert "the signature did not verify: a volume is signed by key" in line
    assert other[-16:] in line and f"not by {environment.fingerprint}" in line
    assert not target.exists()
