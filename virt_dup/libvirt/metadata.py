"""Backup jobs as they live in a domain's XML ``<metadata>``.

The element, exactly as the original virt-dup wrote it::

    <virt-dup:instance xmlns:virt-dup="https://www.github.com/spencerharmon/virt-dup">
      <virt-dup:job uuid="..." schedule="0 2 * * *" depth="0">
        <virt-dup:dev>vda</virt-dup:dev>
      </virt-dup:job>
    </virt-dup:instance>

Every attribute is optional: ``<virt-dup:job />`` inherits every default and
still has a stable id (:func:`derived_job_uuid`).  This module is pure: it
turns XML text into :class:`Job` objects and back, and never talks to
libvirt (the generator uses it on the files in /etc/libvirt/qemu).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lxml import etree

from virt_dup import NAMESPACE
from virt_dup.config.options import OPTIONS, JobOptions, format_value, parse_options
from virt_dup.errors import ConfigError

#: uuid5 namespace for ids of jobs written without a ``uuid`` attribute.
_DERIVED_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, NAMESPACE + "#job")
_NS = "{" + NAMESPACE + "}"
# Disk selectors: the original's attributes and children, and ours.
_DISK_CHILDREN = ("dev", "path")
#: libvirt keeps a domain as ``<config dir>/<name>.xml``: a longer name is no file it wrote.
_MAX_DOMAIN_NAME = 255 - len(".xml")


def safe_parser() -> etree.XMLParser:
    """An XML parser for untrusted text: no entities, no DTD, no network, no huge trees."""
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=False,
    )


def parse_xml(text: str | bytes, where: str) -> etree._Element:
    """Parse untrusted XML text; refuse DTDs and entity declarations outright.

    Raises :class:`ConfigError` naming ``where``.
    """
    data = text.encode() if isinstance(text, str) else text
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as error:
        raise ConfigError(f"{where}: not well-formed XML: {error}") from None
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.doctype:
        raise ConfigError(f"{where}: XML with a DOCTYPE/entity declarations is refused")
    return root


def is_valid_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def derived_job_uuid(domain_uuid: str, ordinal: int) -> str:
    """The stable id of the ``ordinal``-th job without a ``uuid`` attribute.

    Derived from the domain UUID so the generator (which reads XML files)
    and the CLI (which asks libvirt) agree without writing anything.
    """
    return str(uuid.uuid5(_DERIVED_NAMESPACE, f"{domain_uuid.lower()}/{ordinal}"))


@dataclass(frozen=True)
class DiskSelector:
    """Which disks a job backs up: by target dev and/or by source file.

    Empty means every qcow2 disk of the domain.
    """

    devs: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    @property
    def all_disks(self) -> bool:
        return not self.devs and not self.paths

    def describe(self) -> str:
        return ",".join(self.devs + self.paths) or "all qcow2 disks"


@dataclass(frozen=True)
class Job:
    """One ``<virt-dup:job>`` of one domain."""

    uuid: str
    domain_name: str
    domain_uuid: str
    disks: DiskSelector = DiskSelector()
    options: JobOptions = JobOptions()
    #: True when the XML has no uuid attribute and the id is derived.
    uuid_derived: bool = False
    notices: tuple[str, ...] = field(default=(), compare=False)


def _local_name(element: etree._Element) -> str:
    return etree.QName(element).localname


def _is_ours(element: etree._Element, name: str) -> bool:
    """True for ``<virt-dup:NAME>`` and for a plain ``<NAME>``.

    libvirt stores the element namespaced (that is what the XML files hold)
    but ``virDomainGetMetadata`` returns it with the namespace stripped.
    """
    if not isinstance(element.tag, str):
        return False  # comments, processing instructions
    qualified = etree.QName(element)
    return qualified.localname == name and qualified.namespace in (None, NAMESPACE)


def _jobs_of(instance: etree._Element) -> list[etree._Element]:
    return [child for child in instance if _is_ours(child, "job")]


def instance_element(domain_root: etree._Element) -> etree._Element | None:
    """The ``<virt-dup:instance>`` inside a whole ``<domain>`` document, if any."""
    metadata = domain_root.find("metadata")
    if metadata is None:
        return None
    return metadata.find(_NS + "instance")


def parse_instance(
    instance: etree._Element | None,
    domain_name: str,
    domain_uuid: str,
    where: str,
    errors: list[str] | None = None,
) -> list[Job]:
    """Jobs of one domain from its ``<virt-dup:instance>`` element.

    Raises :class:`ConfigError` for a malformed job (bad option value,
    bad uuid, unknown child element); with ``errors`` given, such a job is
    left out and its one-line error appended there instead (the generator:
    a broken job must not cost the domain's other jobs their timers).
    """
    if instance is None:
        return []
    jobs: list[Job] = []
    seen: set[str] = set()
    duplicated: set[str] = set()
    # Ids virt-dup once derived are written back explicitly; a job added by
    # hand later must not derive one of those again.
    explicit = {
        value.strip().lower()
        for element in _jobs_of(instance)
        if (value := element.get("uuid")) is not None
    }
    derived_ordinal = 0
    for position, element in enumerate(_jobs_of(instance)):
        job_where = f"{where}: job {position + 1}"
        attributes: dict[str, str] = {str(k): str(v) for k, v in element.attrib.items()}
        raw_uuid = attributes.pop("uuid", None)
        derived = None
        if raw_uuid is None:
            # Before the job is checked: a broken job keeps its place, so the
            # ids derived after it stay the same once it is fixed.
            derived = derived_job_uuid(domain_uuid, derived_ordinal)
            while derived in explicit:
                derived_ordinal += 1
                derived = derived_job_uuid(domain_uuid, derived_ordinal)
            derived_ordinal += 1
        try:
            job = _parse_job(
                element, attributes, (domain_name, domain_uuid), raw_uuid, derived, job_where
            )
        except ConfigError as error:
            if errors is None:
                raise
            errors.append(str(error))
            continue
        if job.uuid in seen:
            message = f"{job_where}: duplicate job uuid {job.uuid}"
            if errors is None:
                raise ConfigError(message)
            # Which of the two would run is anybody's guess: neither gets a timer.
            errors.append(message)
            duplicated.add(job.uuid)
        seen.add(job.uuid)
        jobs.append(job)
    return [job for job in jobs if job.uuid not in duplicated]


def _parse_job(
    element: etree._Element,
    attributes: dict[str, str],
    domain: tuple[str, str],
    raw_uuid: str | None,
    derived: str | None,
    where: str,
) -> Job:
    """One job of ``domain`` (name, uuid) from its element; ``derived``: its id
    when the element has none.  Raises :class:`ConfigError`."""
    disks = _disk_selector(element, attributes, where)
    parsed = parse_options(attributes, where)
    if derived is not None:
        job_uuid = derived
    elif raw_uuid is not None and is_valid_uuid(raw_uuid.strip()):
        job_uuid = raw_uuid.strip().lower()
    else:
        raise ConfigError(f"{where}.uuid: expected a UUID, got {raw_uuid!r}")
    return Job(
        uuid=job_uuid,
        domain_name=domain[0],
        domain_uuid=domain[1],
        disks=disks,
        options=parsed.options,
        uuid_derived=derived is not None,
        notices=parsed.notices,
    )


def _disk_selector(element: etree._Element, attributes: dict[str, str], where: str) -> DiskSelector:
    """The disks a ``<virt-dup:job>`` names: the original's ``dev_name``/``path``
    attributes (taken out of ``attributes``) and ``<virt-dup:dev>``/``<virt-dup:path>``
    children.  Raises :class:`ConfigError` for any other child or an empty one."""
    devs: list[str] = []
    paths: list[str] = []
    if "dev_name" in attributes:
        devs.append(attributes.pop("dev_name").strip())
    if "path" in attributes:
        paths.append(attributes.pop("path").strip())
    for child in element:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        name = _local_name(child)
        if not _is_ours(child, name) or name not in _DISK_CHILDREN:
            raise ConfigError(f"{where}: unexpected element <{child.tag}>")
        value = (child.text or "").strip()
        if not value:
            raise ConfigError(f"{where}: empty <virt-dup:{name}>")
        (devs if name == "dev" else paths).append(value)
    return DiskSelector(tuple(devs), tuple(paths))


def parse_instance_text(text: str | None, domain_name: str, domain_uuid: str) -> list[Job]:
    """Jobs from the text libvirt's ``virDomainGetMetadata`` returns (or None)."""
    if not text:
        return []
    where = f"domain {domain_name}: virt-dup metadata"
    root = parse_xml(text, where)
    if not _is_ours(root, "instance"):
        raise ConfigError(f"{where}: expected <virt-dup:instance>, found <{root.tag}>")
    return parse_instance(root, domain_name, domain_uuid, where)


def parse_domain_xml(
    text: str | bytes, where: str, errors: list[str] | None = None
) -> tuple[str, str, list[Job]]:
    """(domain name, domain uuid, jobs) of a whole domain XML document.

    Used on libvirt's persistent config files, which the generator reads.
    ``errors``: as for :func:`parse_instance`.
    """
    root = parse_xml(text, where)
    if root.tag != "domain":
        raise ConfigError(f"{where}: not a libvirt domain definition")
    name = (root.findtext("name") or "").strip()
    domain_uuid = (root.findtext("uuid") or "").strip().lower()
    if not name or not is_valid_uuid(domain_uuid):
        raise ConfigError(f"{where}: domain without a valid <name> and <uuid>")
    if len(name.encode()) > _MAX_DOMAIN_NAME:
        raise ConfigError(
            f"{where}: domain name of {len(name.encode())} bytes; libvirt's are at most "
            f"{_MAX_DOMAIN_NAME}"
        )
    jobs = parse_instance(instance_element(root), name, domain_uuid, where, errors)
    return name, domain_uuid, jobs


def render_instance(jobs: Iterable[Job]) -> str:
    """The ``<instance>`` text for ``jobs``, as ``virDomainSetMetadata`` wants it.

    The text carries no namespace: libvirt puts the whole element into
    virt-dup's namespace (prefix ``virt-dup``) itself, and refuses a root
    that declares it already.  Every job is written with its uuid, so ids
    derived for hand-written jobs become permanent the first time virt-dup
    rewrites the element.
    """
    instance = etree.Element("instance")
    for job in jobs:
        element = etree.SubElement(instance, "job")
        element.set("uuid", job.uuid)
        values = job.options.set_values()
        for option in OPTIONS:
            if option.name in values:
                element.set(option.name, format_value(values[option.name]))
        for dev in job.disks.devs:
            etree.SubElement(element, "dev").text = dev
        for path in job.disks.paths:
            etree.SubElement(element, "path").text = path
    return etree.tostring(instance, encoding="unicode")


def duplicate_job_message(job_uuid: str, domain_names: Sequence[str]) -> str:
    """The one line that says a job id is in several domains, and what to do."""
    clones = domain_names[1:]
    fix = " && ".join(
        f"virt-dup remove-all-jobs {name} --yes && virt-dup add-job {name}" for name in clones
    )
    return (
        f"job {job_uuid} is in domains {', '.join(domain_names)} (virt-clone copies a "
        f"domain's <metadata>): give each its own job, e.g. {fix}"
    )
