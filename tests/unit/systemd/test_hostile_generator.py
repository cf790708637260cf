"""Hostile-input corpus, domain metadata -> the generator: valid jobs keep their
timers, and no unit carries injected content.

Each case is a domain XML file as libvirt's config dir could hold it, next to
a valid domain.  Refused cases: the hostile job gets no timer and one warning
line naming the file.  Escaped cases (free text that may reach a unit:
domain names, descriptions, disk selectors): the timer is written, and its
text is checked line by line -- only the directives the generator writes,
only ``[Unit]`` and ``[Timer]``, every ``%`` doubled, no continuation
backslash.  The whole corpus then goes through the generator's ``main``
as systemd runs it, asserted on the files it writes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from virt_dup.config.load import parse_config
from virt_dup.systemd import generator
from virt_dup.systemd.generator import render_units

NAMESPACE = "https://www.github.com/spencerharmon/virt-dup"
VALID_UUID = "5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61"
HOSTILE_UUID = "6f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61"
VALID_JOB = "11111111-2222-4333-8444-555555555555"
HOSTILE_JOB = "22222222-2222-4333-8444-555555555555"
INJECTED = "x&#10;[Service]&#10;ExecStart=/bin/sh -c evil"

#: Every directive a generated timer may hold (and the sections it may open).
DIRECTIVES = {
    # Timers; and each job's services' description drop-in (40-virt-dup-description.conf).
    "[Unit]": {"Description", "Documentation", "PartOf"},
    "[Timer]": {
        "OnCalendar",
        "OnBootSec",
        "Persistent",
        "AccuracySec",
        "RandomizedDelaySec",
        "Unit",
    },
    # The paths drop-in of each job's services (50-virt-dup-paths.conf).
    "[Service]": {"ReadWritePaths"},
}


def timers(generated: generator.GeneratedUnits) -> list[str]:
    return sorted(name for name in generated.files if name.endswith(".timer"))


def domain_file(
    jobs: str,
    name: str = "hostile",
    domain_uuid: str = HOSTILE_UUID,
    namespace: str = NAMESPACE,
    prolog: str = "",
) -> bytes:
    return (
        f"{prolog}<domain type='kvm'><name>{name}</name><uuid>{domain_uuid}</uuid>"
        f"<metadata><virt-dup:instance xmlns:virt-dup='{namespace}'>{jobs}"
        "</virt-dup:instance></metadata></domain>"
    ).encode()


def job(attributes: str = "", children: str = "") -> str:
    start = f"<virt-dup:job uuid='{HOSTILE_JOB}' schedule='@daily' {attributes}>"
    return f"{start}{children}</virt-dup:job>"


VALID = domain_file(f"<virt-dup:job uuid='{VALID_JOB}' schedule='0 2 * * *'/>", "valid", VALID_UUID)

BILLION_LAUGHS = (
    "<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY lol 'lol'>"
    "<!ENTITY lol2 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>"
    "<!ENTITY lol3 '&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;'>"
    "<!ENTITY lol4 '&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;'>]>"
)


def refused(case_id: str, data: bytes, warning: str) -> object:
    return pytest.param(data, warning, id=case_id)


REFUSED = [
    refused("unknown attribute", domain_file(job("ExecStart='/bin/sh'")), "unknown option"),
    refused(
        "attribute in our namespace",
        domain_file(job("virt-dup:schedule='@hourly'")),
        "unknown option",
    ),
    refused(
        "attribute in a foreign namespace",
        domain_file(job("xmlns:e='urn:e' e:schedule='@hourly'")),
        "unknown option",
    ),
    refused(
        "unknown child element",
        domain_file(job(children="<virt-dup:exec>/bin/sh</virt-dup:exec>")),
        "unexpected element",
    ),
    refused(
        "XInclude of /etc/passwd",
        domain_file(
            job(
                children="<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' "
                "href='/etc/passwd'/>"
            )
        ),
        "unexpected element",
    ),
    refused(
        "job uuid given twice in one domain",
        domain_file(job() + job()),
        "duplicate job uuid",
    ),
    refused(
        "job uuid with a newline",
        domain_file(f"<virt-dup:job uuid='{HOSTILE_JOB}&#10;x' schedule='@daily'/>"),
        "expected a UUID",
    ),
    refused(
        "job uuid with unit-name characters",
        domain_file("<virt-dup:job uuid='../../x@y.service' schedule='@daily'/>"),
        "expected a UUID",
    ),
    refused(
        "job uuid in braces",
        domain_file(f"<virt-dup:job uuid='{{{HOSTILE_JOB}}}' schedule='@daily'/>"),
        "expected a UUID",
    ),
    refused(
        "domain uuid with a newline",
        domain_file(job(), domain_uuid=HOSTILE_UUID + "&#10;x"),
        "domain without a valid <name> and <uuid>",
    ),
    refused(
        "billion laughs",
        domain_file(job("description='&lol4;'"), prolog=BILLION_LAUGHS),
        "DOCTYPE/entity declarations is refused",
    ),
    refused(
        "external entity /etc/passwd",
        domain_file(
            job("description='&x;'"),
            prolog="<!DOCTYPE domain [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>",
        ),
        "not well-formed XML",
    ),
    refused(
        "parameter entity from the network",
        domain_file(
            job(),
            prolog="<!DOCTYPE domain [<!ENTITY % p SYSTEM 'http://127.0.0.1:9/x.dtd'> %p;]>",
        ),
        "DOCTYPE",
    ),
    refused("nested 10000 deep", domain_file(job() + "<a>" * 10000 + "</a>" * 10000), "depth"),
    refused("truncated file", domain_file(job())[:-20], "not well-formed XML"),
    refused(
        "invalid UTF-8",
        domain_file(job("description='caf\xe9'")).replace(b"\xc3\xa9", b"\xe9"),
        "not well-formed XML",
    ),
    refused(
        "2 MB domain name",
        domain_file(job(), name="n" * 2_000_000),
        "domain name of 2000000 bytes",
    ),
    refused(
        "5 MB description",
        domain_file(job("description='" + "d" * 5_000_000 + "'")),
        "expected at most 4096 characters",
    ),
    refused(
        "5000-digit depth",
        domain_file(job("depth='" + "9" * 5000 + "'")),
        "expected an integer",
    ),
    refused(
        "full_every of 10^17 days",
        domain_file(job("full_every='99999999999999999D'")),
        "expected an interval",
    ),
    refused(
        "description with [Service] ExecStart=",
        domain_file(job(f"description='{INJECTED}'")),
        "expected one line of text without control characters",
    ),
    refused(
        "schedule with [Service] ExecStart=",
        domain_file(
            f"<virt-dup:job uuid='{HOSTILE_JOB}' schedule='@daily&#10;[Service]&#10;ExecStart=x'/>"
        ),
        "expected one line of text",
    ),
    refused(
        "schedule with a carriage return",
        domain_file(f"<virt-dup:job uuid='{HOSTILE_JOB}' schedule='@daily&#13;OnCalendar=x'/>"),
        "expected one line of text",
    ),
    refused(
        "schedule with a % specifier",
        domain_file(f"<virt-dup:job uuid='{HOSTILE_JOB}' schedule='0 2 * * %i'/>"),
        "invalid schedule",
    ),
    refused(
        "full_schedule with a newline",
        domain_file(job("full_schedule='@weekly&#10;ExecStart=x'")),
        "full_schedule: expected one line of text",
    ),
    refused(
        "verify_schedule of 200000 characters",
        domain_file(job("verify_schedule='" + "1," * 100000 + "1 * * * *'")),
        "expected at most 4096 characters",
    ),
    refused(
        "schedule with a 200-digit step",
        domain_file(job().replace("@daily", "*/" + "9" * 200 + " * * * *")),
        "invalid schedule",
    ),
    refused(
        "backend starting with -",
        domain_file(job("backends='--exclude-filelist=/etc'")),
        "expected backend names or duplicity URLs",
    ),
    refused(
        "backend URL with a newline",
        domain_file(job("backends='file:///b&#10;x'")),
        "expected one line of text",
    ),
    refused(
        "encryption key that is no key id",
        domain_file(job("encryption_keys='--homedir=/tmp'")),
        "expected GPG key ids",
    ),
]


def escaped(case_id: str, data: bytes, description_part: str) -> object:
    return pytest.param(data, description_part, id=case_id)


ESCAPED = [
    escaped(
        "domain name with [Service] ExecStart=",
        domain_file(job(), name=INJECTED),
        "x?[Service]?ExecStart=/bin/sh -c evil",
    ),
    escaped("domain name with % specifiers", domain_file(job(), name="vm%i%n%h"), "vm%%i%%n%%h"),
    escaped("domain name with a trailing backslash", domain_file(job(), name="vm\\"), "of vm\\ ("),
    escaped(
        "dev child with [Service] ExecStart=",
        domain_file(job(children=f"<virt-dup:dev>{INJECTED}</virt-dup:dev>")),
        "(x?[Service]?ExecStart=/bin/sh -c evil)",
    ),
    escaped(
        "dev child in CDATA with a newline",
        domain_file(job(children="<virt-dup:dev><![CDATA[vda\nExecStart=x]]></virt-dup:dev>")),
        "(vda?ExecStart=x)",
    ),
    escaped(
        "path child with [Service] ExecStart=",
        domain_file(job(children=f"<virt-dup:path>/i/{INJECTED}</virt-dup:path>")),
        "(/i/x?[Service]?ExecStart=/bin/sh -c evil)",
    ),
    escaped(
        "dev_name attribute with % specifiers",
        domain_file(job("dev_name='%n%%'")),
        "(%%n%%%%)",
    ),
    escaped(
        "path attribute ending in a backslash",
        domain_file(job("path='/i/a\\'")),
        "(/i/a\\)",
    ),
    escaped(
        "description with % specifiers",
        domain_file(job("description='%i %h %n %%'")),
        ": %%i %%h %%n %%%%",
    ),
    escaped(
        "description ending in a backslash",
        domain_file(job("description='tail\\'")),
        ": tail\n",
    ),
    escaped(
        "description with a literal newline (XML makes it a space)",
        domain_file(job("description='x\n[Service]\nExecStart=/bin/sh'")),
        ": x [Service] ExecStart=/bin/sh",
    ),
    escaped(
        "description with Unicode line separators",
        domain_file(job("description='a\u2028b\u0085c'")),
        ": a\u2028b\u0085c",
    ),
]


def assert_clean_unit(name: str, text: str) -> None:
    """Only the generator's own sections and directives, every ``%`` doubled.

    Lines are split as systemd splits them: at ``\\n`` only (U+2028 is no line end).
    """
    section = None
    for line in text.split("\n"):
        assert not line.endswith("\\"), (name, line)
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            assert line in DIRECTIVES, (name, line)
            section = line
            continue
        key, separator, value = line.partition("=")
        assert separator and section is not None, (name, line)
        assert key in DIRECTIVES[section], (name, line)
        assert "%" not in value.replace("%%", ""), (name, line)
    assert "ExecStart" not in "".join(
        line for line in text.split("\n") if not line.startswith(("Description=", "#"))
    )


def render(*files: tuple[str, bytes]) -> generator.GeneratedUnits:
    return render_units(parse_config("randomized_delay: 10min\n", Path("c.yml")), list(files))


@pytest.mark.parametrize(("data", "warning"), REFUSED)
def test_a_hostile_job_gets_no_timer_and_the_valid_one_keeps_its_own(
    data: bytes, warning: str
) -> None:
    generated = render(("/etc/libvirt/qemu/valid.xml", VALID), ("/etc/libvirt/qemu/h.xml", data))

    assert timers(generated) == [f"virt-dup@{VALID_JOB}.timer"]
    assert f"timers.target.wants/virt-dup@{VALID_JOB}.timer" in generated.symlinks
    (line,) = generated.warnings
    assert "h.xml" in line and warning in line, line[:300]
    assert "\n" not in line and len(line) < 600, line[:600]
    for name, text in generated.files.items():
        assert_clean_unit(name, text)


@pytest.mark.parametrize(("data", "description_part"), ESCAPED)
def test_free_text_reaches_a_timer_only_escaped(data: bytes, description_part: str) -> None:
    generated = render(("valid.xml", VALID), ("h.xml", data))

    assert timers(generated) == sorted(
        [f"virt-dup@{VALID_JOB}.timer", f"virt-dup@{HOSTILE_JOB}.timer"]
    )
    assert generated.warnings == []
    for name, text in generated.files.items():
        assert_clean_unit(name, text)
    for unit in (
        f"virt-dup@{HOSTILE_JOB}.timer",
        f"virt-dup@{HOSTILE_JOB}.service.d/40-virt-dup-description.conf",
    ):
        text = generated.files[unit]
        (description,) = [line for line in text.split("\n") if line.startswith("Description=")]
        assert description_part.rstrip("\n") in description, unit
        if description_part.endswith("\n"):
            assert description.endswith(description_part.rstrip("\n")), unit


IGNORED = [
    pytest.param(
        domain_file(job(), namespace="https://evil.example/virt-dup"), id="wrong namespace"
    ),
    pytest.param(domain_file(job(), namespace=NAMESPACE + "/"), id="namespace with a slash added"),
    pytest.param(
        domain_file(f"<virt-dup:instance>{job()}</virt-dup:instance>"), id="nested instance"
    ),
    pytest.param(domain_file("<virt-dup:jobs/>"), id="unknown element beside the jobs"),
    pytest.param(
        domain_file("<?ExecStart /bin/sh?><!-- [Service] -->"), id="processing instruction"
    ),
]


@pytest.mark.parametrize("data", IGNORED)
def test_metadata_that_is_not_ours_makes_no_timer(data: bytes) -> None:
    generated = render(("valid.xml", VALID), ("h.xml", data))
    assert timers(generated) == [f"virt-dup@{VALID_JOB}.timer"]
    assert generated.warnings == []


def test_a_job_uuid_in_two_domains_gets_one_timer_and_a_warning() -> None:
    clone = domain_file(job(), name="clone", domain_uuid="7f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61")
    generated = render(("valid.xml", VALID), ("h.xml", domain_file(job())), ("c.xml", clone))
    assert timers(generated) == sorted(
        [f"virt-dup@{VALID_JOB}.timer", f"virt-dup@{HOSTILE_JOB}.timer"]
    )
    (line,) = generated.warnings
    assert "h.xml, c.xml" in line and "domains hostile, clone" in line


def test_a_broken_job_does_not_take_the_valid_jobs_of_its_domain_with_it() -> None:
    both = domain_file(
        "<virt-dup:job uuid='33333333-2222-4333-8444-555555555555' schedule='@daily'/>"
        + job("ExecStart='/bin/sh'")
    )
    generated = render(("h.xml", both))
    assert "virt-dup@33333333-2222-4333-8444-555555555555.timer" in generated.files


def test_the_generator_writes_every_valid_timer_and_nothing_injected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole corpus in one libvirt config dir, through ``main`` as systemd runs it."""
    config_dir = tmp_path / "qemu"
    config_dir.mkdir()
    (config_dir / "valid.xml").write_bytes(VALID)
    cases = [*REFUSED, *ESCAPED, *IGNORED]
    for number, param in enumerate(cases):
        data = param.values[0]
        # each hostile domain a uuid and job id of its own, so none is a "duplicate"
        own = f"{number:08x}-2222-4333-8444-555555555555"
        data = data.replace(HOSTILE_JOB.encode(), own.encode()).replace(
            HOSTILE_UUID.encode(), f"{number:08x}-2f5e-4c1a-9a53-1d2f0c8b7a61".encode()
        )
        (config_dir / f"case{number:02d}.xml").write_bytes(data)
    config = tmp_path / "virt-dup.yml"
    config.write_text(f"randomized_delay: 10min\nlibvirt:\n  config_dir: {config_dir}\n")
    monkeypatch.setenv("VIRT_DUP_CONFIG", str(config))
    monkeypatch.delenv("SYSTEMD_SCOPE", raising=False)
    output = tmp_path / "normal"
    output.mkdir()

    assert generator.main([str(output), str(tmp_path / "early"), str(tmp_path / "late")]) == 0

    timers = sorted(path.name for path in output.glob("*.timer"))
    assert f"virt-dup@{VALID_JOB}.timer" in timers
    assert len(timers) == 1 + len(ESCAPED)
    units = [path for path in output.rglob("*") if path.is_file()]
    assert len(units) > len(timers)  # the paths drop-ins too
    for path in units:
        assert_clean_unit(path.name, path.read_text())
    wanted = sorted(path.name for path in (output / "timers.target.wants").iterdir())
    assert wanted == timers
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == len(REFUSED)
    assert all(re.match(r"virt-dup-generator: skipped .*case\d\d\.xml", line) for line in warnings)


def test_an_unreadable_virt_dup_yml_is_a_warning_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nested too deep for PyYAML: the generator says so and goes on with the
    built-in defaults (which read libvirt's own config dir: its timers are not
    asserted here)."""
    config = tmp_path / "virt-dup.yml"
    config.write_text("[" * 20000 + "]" * 20000)
    monkeypatch.setenv("VIRT_DUP_CONFIG", str(config))
    monkeypatch.setenv("SYSTEMD_SCOPE", "user")  # the defaults' scope is system: nothing written
    output = tmp_path / "normal"
    output.mkdir()

    assert generator.main([str(output)]) == 0

    assert list(output.iterdir()) == []
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"virt-dup-generator: {config}: YAML nested too deeply; using built-in defaults"
