"""virt-dup.yml: validation into typed objects, errors naming file + key, legacy spellings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from virt_dup.config.load import load_config, parse_config
from virt_dup.errors import ConfigError

PATH = Path("/etc/virt-dup/virt-dup.yml")
FINGERPRINT = "0123456789ABCDEF0123456789ABCDEF01234567"


def test_empty_file_means_defaults() -> None:
    config = parse_config("", PATH)
    assert config.libvirt_uri == "qemu:///system"
    assert config.defaults.depth == 0
    assert config.defaults.encryption == "gpg"
    assert config.defaults.schedule is None
    assert config.backends == {}


def test_full_config_is_typed() -> None:
    config = parse_config(
        f"""
scope: system
libvirt:
  uri: qemu+ssh://root@host/system
  config_dir: /etc/libvirt/qemu
backends:
  local: file:///srv/backups
  offsite: sftp://backup@127.0.0.1//srv/virt-dup
encryption:
  keys: [{FINGERPRINT}]
  gnupg_home: /etc/virt-dup/gnupg
  passphrase_file: /etc/virt-dup/passphrase
defaults:
  schedule: "0 2 * * *"
  depth: -1
  backends: [local, offsite]
  full_every: 2W
  full_retention: 3
randomized_delay: 10min
""",
        PATH,
    )
    assert config.libvirt_uri == "qemu+ssh://root@host/system"
    assert config.backends["offsite"] == "sftp://backup@127.0.0.1//srv/virt-dup"
    assert config.encryption.keys == (FINGERPRINT,)
    assert config.encryption.passphrase_file == Path("/etc/virt-dup/passphrase")
    assert config.defaults.schedule == "0 2 * * *"
    assert config.defaults.depth == -1
    assert config.defaults.backends == ("local", "offsite")
    assert config.defaults.full_retention == 3
    assert config.defaults.incremental_retention == 1  # built-in default kept
    assert config.backend_url("local") == "file:///srv/backups"
    assert config.backend_url("file:///x") == "file:///x"
    assert config.notices == ()


def test_user_scope_defaults_to_session_uri() -> None:
    assert parse_config("scope: user\n", PATH).libvirt_uri == "qemu:///session"


def test_original_virt_dup_config_loads_with_same_meaning() -> None:
    config = parse_config(
        """
libvirt-uri: qemu+tcp://localhost/system
libvirt-username: admin
libvirt-password: s3cret-value
libvirt-flags: 0
duplicity-backends:
  - file:///srv/backups
staging-area: /var/tmp/virt-dup
depth: -1
default-schedule: "*/30 * * * *"
""",
        PATH,
    )
    assert config.libvirt_uri == "qemu+tcp://localhost/system"
    assert config.libvirt.username == "admin"
    assert config.libvirt.password == "s3cret-value"
    assert config.backends == {"file:///srv/backups": "file:///srv/backups"}
    assert config.defaults.depth == -1
    assert config.defaults.schedule == "*/30 * * * *"
    # one notice per deprecated spelling, and the secret never appears in one
    assert len(config.notices) == 8
    assert all("s3cret-value" not in notice for notice in config.notices)
    assert "s3cret-value" not in repr(config)
    assert any("staging-area" in notice and "ignored" in notice for notice in config.notices)


def test_seed_readme_spelling_default_schedule() -> None:
    config = parse_config('default_schedule: "0 1 * * *"\n', PATH)
    assert config.defaults.schedule == "0 1 * * *"
    assert config.notices


def test_libvirt_socket_true_means_local_socket() -> None:
    assert parse_config("libvirt-socket: true\n", PATH).libvirt_uri == "qemu:///system"
    assert parse_config("libvirt-socket: true\nscope: user\n", PATH).libvirt_uri == (
        "qemu:///session"
    )


def test_two_spellings_of_one_setting_are_an_error() -> None:
    with pytest.raises(ConfigError, match="not two"):
        parse_config("default-schedule: '@daily'\ndefault_schedule: '@hourly'\n", PATH)


def test_compound_time_span() -> None:
    assert parse_config("randomized_delay: 1h 30min\n", PATH).randomized_delay == "1h 30min"


@pytest.mark.parametrize("option", ["changed_blocks", "quiesce"])
def test_an_unquoted_off_is_off_not_a_boolean(option: str) -> None:
    """YAML 1.1 reads ``off`` as false: a choice that has ``off`` takes it."""
    defaults = parse_config(f"defaults:\n  {option}: off\n", PATH).defaults
    assert getattr(defaults, option) == "off"


BAD_CONFIGS = [
    ("defaults:\n  changed_blocks: on\n", "defaults.changed_blocks: expected one of auto, off"),
    ("libvirt: [unclosed\n", "YAML syntax error at line"),
    ("- a\n- b\n", "expected a mapping of settings at the top level"),
    ("libvirt_ur: x\n", "libvirt_ur: unknown key"),
    ("libvirt:\n  url: qemu:///system\n", "libvirt.url: unknown key (did you mean uri?)"),
    ("scope: cluster\n", "scope: expected system or user"),
    ("defaults:\n  depth: deep\n", "defaults.depth: expected an integer"),
    ("defaults:\n  depth: true\n", "defaults.depth: expected an integer"),
    ("defaults:\n  schedule: '61 * * * *'\n", "defaults.schedule: invalid schedule"),
    ("defaults:\n  schedul: '0 2 * * *'\n", "defaults.schedul: unknown option"),
    ("defaults:\n  full_retention: 0\n", "defaults.full_retention: expected a whole number"),
    ("defaults:\n  full_every: monthly\n", "defaults.full_every: expected an interval"),
    ("defaults:\n  quiesce: maybe\n", "defaults.quiesce: expected one of auto, required, off"),
    ("defaults:\n  backends: [nowhere]\n", "defaults.backends: expected a backend defined"),
    ("backends:\n  local: /srv/backups\n", "backends.local: expected a duplicity URL"),
    ("backends: 5\n", "backends: expected a mapping"),
    ("encryption:\n  keys: [nothex]\n", "encryption.keys: expected GPG key ids"),
    (
        "encryption:\n  gnupg_home: relative/dir\n",
        "encryption.gnupg_home: expected an absolute path",
    ),
    ("libvirt:\n  flags: -1\n", "libvirt.flags: expected a non-negative integer"),
    ("randomized_delay: soon\n", "randomized_delay: expected a systemd time span"),
    ("encryption:\n  sign_key: [AAAAAAAA, BBBBBBBB]\n", "encryption.sign_key: expected one key"),
    ("backends:\n  _x: file:///srv\n", "backends._x: expected a name of ASCII letters"),
    ("libvirt-socket: maybe\n", "libvirt-socket: expected true or false"),
    ('defaults:\n  description: "two\\nlines"\n', "defaults.description: expected one line"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_config_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    error = str(caught.value)
    assert error.startswith(f"{PATH}: ")
    assert message in error
    assert "\n" not in error


def test_named_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "missing.yml")


def test_environment_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "virt-dup.yml"
    path.write_text("defaults:\n  depth: 2\n")
    monkeypatch.setenv("VIRT_DUP_CONFIG", str(path))
    config = load_config()
    assert config.path == path
    assert config.defaults.depth == 2


def test_unknown_backend_name_is_config_error() -> None:
    config = parse_config("backends:\n  local: file:///srv\n", PATH)
    with pytest.raises(ConfigError, match="no backend named 'remote'"):
        config.backend_url("remote")


def test_libvirt_config_dir_follows_the_uri_not_the_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/u/.config")
    assert parse_config("scope: user\n", PATH).libvirt_config_dir == Path(
        "/home/u/.config/libvirt/qemu"
    )
    user_with_system_vms = parse_config("scope: user\nlibvirt:\n  uri: qemu:///system\n", PATH)
    assert user_with_system_vms.libvirt_config_dir == Path("/etc/libvirt/qemu")
    assert parse_config("", PATH).libvirt_config_dir == Path("/etc/libvirt/qemu")


@pytest.fixture
def xdg_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.local/state")
    monkeypatch.setenv("XDG_CACHE_HOME", "/home/u/.cache")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)


@pytest.mark.usefixtures("xdg_environment")
def test_root_in_the_system_scope_keeps_the_host_directories() -> None:
    config = dataclasses.replace(parse_config("", PATH), euid=0)
    assert config.state_directory == Path("/var/lib/virt-dup")
    assert config.cache_directory == Path("/var/cache/virt-dup")
    assert config.lock_directory == Path("/run/virt-dup/locks")


@pytest.mark.usefixtures("xdg_environment")
def test_a_user_other_than_root_on_the_session_gets_the_xdg_directories() -> None:
    config = dataclasses.replace(
        parse_config("libvirt:\n  uri: qemu:///session\n", PATH), euid=1000
    )
    assert config.scope == "system"  # the manager: a setting of its own
    assert config.state_directory == Path("/home/u/.local/state/virt-dup")
    assert config.cache_directory == Path("/home/u/.cache/virt-dup")
    assert config.lock_directory == Path("/run/user/1000/virt-dup/locks")


@pytest.mark.usefixtures("xdg_environment")
def test_a_user_other_than_root_on_qemu_system_still_takes_the_host_locks() -> None:
    """Root's runs of the same domains lock there: a lock of the user's own
    would not keep the two apart (an unwritable host lock dir fails clearly)."""
    config = dataclasses.replace(parse_config("", PATH), euid=1000)
    assert config.libvirt_uri == "qemu:///system"
    assert config.state_directory == Path("/home/u/.local/state/virt-dup")
    assert config.lock_directory == Path("/run/virt-dup/locks")


@pytest.mark.usefixtures("xdg_environment")
def test_the_user_scope_gets_the_xdg_directories_even_for_root() -> None:
    config = dataclasses.replace(parse_config("scope: user\n", PATH), euid=0)
    assert config.state_directory == Path("/home/u/.local/state/virt-dup")
    assert config.cache_directory == Path("/home/u/.cache/virt-dup")
    assert config.lock_directory == Path("/run/user/1000/virt-dup/locks")


def test_xdg_defaults_fall_back_to_the_home_and_the_uid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    config = dataclasses.replace(
        parse_config("libvirt:\n  uri: qemu:///session\n", PATH), euid=1234
    )
    assert config.state_directory == tmp_path / ".local/state/virt-dup"
    assert config.cache_directory == tmp_path / ".cache/virt-dup"
    assert config.lock_directory == Path("/run/user/1234/virt-dup/locks")


@pytest.mark.usefixtures("xdg_environment")
def test_named_directories_win_over_every_default() -> None:
    config = dataclasses.replace(
        parse_config("state_dir: /srv/state\ncache_dir: /srv/cache\n", PATH), euid=1000
    )
    assert config.state_directory == Path("/srv/state")
    assert config.cache_directory == Path("/srv/cache")


def test_a_secret_file_others_can_read_gets_a_notice(tmp_path: Path) -> None:
    secret = tmp_path / "passphrase"
    secret.write_text("s3cret\n")
    secret.chmod(0o640)
    config = parse_config(f"encryption:\n  passphrase_file: {secret}\n", tmp_path / "virt-dup.yml")
    assert any(
        "encryption.passphrase_file" in notice and "readable by others (mode 640)" in notice
        for notice in config.notices
    )
    secret.chmod(0o600)
    config = parse_config(f"encryption:\n  passphrase_file: {secret}\n", tmp_path / "virt-dup.yml")
    assert not any("readable by others" in notice for notice in config.notices)


# -- the policy over what job XML may choose -------------------------------------------------

POLICY = """
backends:
  local: file:///srv/backups
encryption:
  keys: [0123456789ABCDEF0123456789ABCDEF01234567]
policy:
  allow_job_backend_urls: false
  require_encryption: true
  allowed_keys: [0123456789ABCDEF0123456789ABCDEF01234567]
"""


def test_a_job_within_the_policy_passes(tmp_path: Path) -> None:
    from virt_dup.config.load import check_policy
    from virt_dup.config.options import JobOptions

    config = parse_config(POLICY, tmp_path / "virt-dup.yml")
    check_policy(config, JobOptions(backends=("local",)), "job x")
    check_policy(
        config, JobOptions(encryption_keys=("0x0123456789abcdef0123456789abcdef01234567",)), "j"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backends": ("sftp://u:pw@evil.example/x",)}, r"backend URL sftp://u:\*\*\*@evil"),
        ({"encryption": "none"}, "encryption none, and the policy"),
        ({"encryption_keys": ("DEADBEEFDEADBEEF",)}, "key DEADBEEFDEADBEEF, which the policy"),
    ],
)
def test_a_job_beyond_the_policy_is_one_line(tmp_path: Path, options: dict, message: str) -> None:
    from virt_dup.config.load import check_policy
    from virt_dup.config.options import JobOptions

    config = parse_config(POLICY, tmp_path / "virt-dup.yml")
    with pytest.raises(ConfigError, match=message) as caught:
        check_policy(config, JobOptions(**options), "job x")
    assert str(caught.value).startswith("job x: ") and "\n" not in str(caught.value)
    assert "pw" not in str(caught.value)


def test_a_job_without_encryption_is_refused_when_restores_require_signatures(
    tmp_path: Path,
) -> None:
    """Plain volumes carry no signature: such a job's backups could never be restored."""
    from virt_dup.config.load import check_policy
    from virt_dup.config.options import JobOptions

    config = parse_config(
        "encryption:\n  keys: [0123456789ABCDEF]\n  sign_key: 0123456789ABCDEF\n"
        "restore:\n  require_signature: true\n",
        tmp_path / "virt-dup.yml",
    )
    check_policy(config, JobOptions(), "job x")
    with pytest.raises(ConfigError, match="could never be restored"):
        check_policy(config, JobOptions(encryption="none"), "job x")


def test_an_unknown_policy_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy"):
        parse_config("policy:\n  allow_backends: false\n", tmp_path / "virt-dup.yml")


# -- restore: what a restore demands of what it reads -----------------------------------------


def test_require_signature_is_off_unless_set() -> None:
    assert parse_config("", PATH).restore.require_signature is False
    config = parse_config(f"encryption:\n  sign_key: {FINGERPRINT}\nrestore: {{}}\n", PATH)
    assert config.restore.require_signature is False


def test_require_signature_with_a_sign_key() -> None:
    config = parse_config(
        f"encryption:\n  keys: [{FINGERPRINT}]\n  sign_key: {FINGERPRINT}\n"
        "restore:\n  require_signature: true\n",
        PATH,
    )
    assert config.restore.require_signature is True
    assert config.encryption.sign_key == FINGERPRINT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "restore:\n  require_signature: true\n",
            "restore.require_signature is true but encryption.sign_key is not set",
        ),
        (
            f"encryption:\n  keys: [{FINGERPRINT}]\nrestore:\n  require_signature: true\n",
            "restore.require_signature is true but encryption.sign_key is not set",
        ),
        (
            f"encryption:\n  sign_key: {FINGERPRINT}\nrestore:\n  require_signature: maybe\n",
            "restore.require_signature: expected true or false",
        ),
        (
            f"encryption:\n  sign_key: {FINGERPRINT}\nrestore:\n  require_signatures: true\n",
            "restore.require_signatures: unknown key (did you mean require_signature?)",
        ),
        ("restore: [require_signature]\n", "restore: expected a mapping"),
        ("restore: true\n", "restore: expected a mapping"),
    ],
)
def test_a_bad_restore_section_is_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    assert str(caught.value).startswith(f"{PATH}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
