"""ddclient on the extranet: keeps the site's OVH DynHost name on the home's public IPv4.

/etc/ddclient.conf holds the DynHost password, so it is never baked: cloud-init writes it at boot (root, 0600), and
only when the site file names a `dynhost`. The image's ddclient.service runs only on a config written here (its
drop-in checks for MARKER): without a dynhost it stays off, whatever Debian's package wrote at install.
"""

from __future__ import annotations

from collections.abc import Mapping

from .compose import merged_secrets, secret_problem
from .errors import DefinitionError
from .site import Site

DDCLIENT_CONF = "/etc/ddclient.conf"
# The VM that updates the DynHost: the DMZ host, the one the router forwards to.
DDCLIENT_ROLE = "extranet"
# Config line -> the secret (secrets file `extranet.NAME` or `common.NAME`) that gives its value.
DDCLIENT_SECRETS = {"login": "OVH_DYNHOST_LOGIN", "password": "OVH_DYNHOST_PASSWORD"}
# First line of every config written here; images/files/extranet/ddclient-homelab.service.conf looks for it.
MARKER = "# homelab: OVH DynHost"


def ddclient_secrets(site: Site, secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """login/password for the site's dynhost; one-line DefinitionError naming a missing or refused secret."""
    merged = merged_secrets(DDCLIENT_ROLE, secrets)
    values = {}
    for key, secret in DDCLIENT_SECRETS.items():
        where = f"secrets: {DDCLIENT_ROLE}.{secret}"
        if secret not in merged:
            raise DefinitionError(f"{where}: missing: {DDCLIENT_CONF} needs it (the site file sets dynhost: "
                                  f"{site.dynhost})")
        problem = secret_problem(secret, merged[secret])
        if problem:
            raise DefinitionError(f"{where}: {problem} ({DDCLIENT_CONF})")
        values[key] = merged[secret]
    return values


def ddclient_conf(site: Site, secrets: Mapping[str, Mapping[str, str]]) -> str | None:
    """The config for Debian 13's ddclient 3.11, or None when the site names no dynhost (ddclient stays off)."""
    if site.dynhost is None:
        return None
    values = ddclient_secrets(site, secrets)
    return "".join(
        line + "\n"
        for line in (
            f"{MARKER}, written at boot by cloud-init from the site file (dynhost) and the secrets file.",
            "ssl=yes",
            # usev4/webv4 (ddclient 3.11) replace use=/web=, which it reports as deprecated. ddclient's default
            # webv4 service (googledomains) is gone: ask ipify, one of its built-in IPv4 discovery services.
            "usev4=webv4, webv4=ipify-ipv4",
            "protocol=ovh",
            "server=www.ovh.com",
            f"login={values['login']}",
            # Single-quoted: ddclient reads the password literally (the secret's rule refuses quotes and spaces).
            f"password='{values['password']}'",
            site.dynhost,
        )
    )


def ddclient_files(role: str, site: Site, secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Path -> content cloud-init writes (root, 0600) for ddclient on `role`: none unless it is the extranet and
    the site names a dynhost."""
    if role != DDCLIENT_ROLE:
        return {}
    conf = ddclient_conf(site, secrets)
    return {} if conf is None else {DDCLIENT_CONF: conf}
