"""The DMZ proxy's desired state: the site's proxy_hosts as Nginx Proxy Manager (NPM) API payloads.

Pure: site in, JSON out. cloud-init writes it at deploy time as DESIRED_PATH on the extranet (0644: it holds no
secret), and the baked applier (images/files/extranet/npm-apply, homelab-npm-proxy-hosts.service) makes NPM match
it at every boot through NPM's REST API. Clicking in NPM's UI stays possible for what the site does not declare.

The payload shapes follow NPM's own request schemas (github.com/NginxProxyManager/nginx-proxy-manager):
- backend/schema/paths/nginx/proxy-hosts/post.json and hostID/put.json: `additionalProperties: false`; the fields
  are defined in backend/schema/components/proxy-host-object.json and backend/schema/common.json;
- backend/schema/paths/nginx/access-lists/post.json and listID/put.json: name, satisfy_any, pass_auth, items
  (basic-auth users), clients ({address, directive: allow|deny}, address an IPv4 CIDR or "all");
- backend/schema/paths/tokens/post.json: {identity, secret} (the applier's login).
Only fields present in every recent 2.x schema are sent (ssl_key_type, default_server and trust_forwarded_proto
come and go between versions, and an unknown field is a 400). TLS (certificate_id, ssl_forced, hsts_*,
http2_support) is deliberately not sent: certificates are requested in NPM's UI, and an update never undoes them.

Rate limits need an http-level `limit_req_zone`, which a proxy host's advanced_config (server level) cannot hold:
NPM's nginx.conf includes /data/nginx/custom/http_top[.]conf at the top of its http block
(docker/rootfs/etc/nginx/nginx.conf), so the state carries that file's content too.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .definition import ImageDefinition
from .errors import RenderError
from .firewall import allowed, zone_networks
from .site import ZONES, Site

# The role whose stack runs NPM; the file exists there only when the site declares proxy hosts.
NPM_ROLE = "extranet"
DESIRED_PATH = "/etc/homelab/npm-proxy-hosts.json"
FORMAT = 1
# What marks NPM objects as ours: the applier updates or deletes only these (and adopts a host whose domain the
# site declares, since NPM refuses a second host for a domain already in use). The comment survives any NPM
# version (advanced_config is stored verbatim); the meta key makes it visible in the API.
MARKER = "# Managed by homelab (npm-apply, from the site file's proxy_hosts): edits here are replaced at boot."
META = {"homelab_managed": True}
ACCESS_LIST_PREFIX = "homelab: "
# A rate limit lets a client burst to this many seconds' worth of requests before nginx answers 503.
BURST_SECONDS = 2


def _ordered(zones: Sequence[str]) -> list[str]:
    """Zones in ZONES order: [vpn, lan] and [lan, vpn] are one access list."""
    return [zone for zone in ZONES if zone in zones]


def access_list_name(zones: Sequence[str]) -> str:
    return ACCESS_LIST_PREFIX + "+".join(_ordered(zones))


def access_list(site: Site, zones: Sequence[str]) -> dict[str, Any]:
    """Allow the zones' networks, deny everyone else. `deny all` is explicit although NPM's template ends with
    one in some versions: the list must be closed whatever template renders it."""
    networks = zone_networks(site.zones)
    addresses: list[str] = []
    for zone in _ordered(zones):
        addresses.extend(net for net in networks[zone] if net not in addresses)
    clients = [{"address": net, "directive": "allow"} for net in addresses]
    # satisfy_any false: the address check alone decides (there are no basic-auth users, items is empty).
    return {"name": access_list_name(zones), "satisfy_any": False, "pass_auth": False, "items": [],
            "clients": [*clients, {"address": "all", "directive": "deny"}]}


def rate_zone(domain: str) -> str:
    """The limit_req zone of a domain: nginx zone names are plain words."""
    return "homelab_" + re.sub(r"[^a-z0-9]", "_", domain)


def advanced_config(entry: Mapping[str, Any]) -> str:
    """Server-level nginx lines for one host; the marker first (see MARKER)."""
    lines = [MARKER,
             f"proxy_read_timeout {entry['timeout_s']}s;",
             f"proxy_send_timeout {entry['timeout_s']}s;"]
    if entry["max_body_mb"] is not None:
        # 0 turns nginx's body size check off (Immich uploads whole videos); NPM's http default is 2000m.
        lines.append(f"client_max_body_size {entry['max_body_mb']}m;" if entry["max_body_mb"] else
                     "client_max_body_size 0;")
    if entry["rate_per_s"] is not None:
        # The burst follows the rate, so a changed rate also changes this host and NPM reloads nginx, which is
        # when the new http_top.conf (holding the rate) takes effect.
        burst = entry["rate_per_s"] * BURST_SECONDS
        lines.append(f"limit_req zone={rate_zone(entry['domain'])} burst={burst} nodelay;")
    return "\n".join(lines) + "\n"


def proxy_host(site: Site, entry: Mapping[str, Any]) -> dict[str, Any]:
    """One host: its payload (POST/PUT body minus access_list_id, which NPM numbers) and its access list's name."""
    target = ipaddress.IPv4Interface(site.host(entry["to"]).address).ip
    payload = {
        "domain_names": [entry["domain"]],
        "forward_scheme": "http",
        "forward_host": str(target),
        "forward_port": entry["port"],
        "allow_websocket_upgrade": entry["websockets"],
        "block_exploits": True,
        "caching_enabled": False,
        "advanced_config": advanced_config(entry),
        "meta": dict(META),
    }
    access = access_list_name(entry["access"]) if entry["access"] else None
    return {"access_list": access, "payload": payload}


def http_top(entries: Sequence[Mapping[str, Any]]) -> str:
    """/data/nginx/custom/http_top.conf: one limit_req_zone per rate-limited host (10 MiB: ~160k addresses)."""
    lines = ["# Written by homelab's npm-apply from the site file's proxy_hosts; replaced at boot."]
    for entry in entries:
        if entry["rate_per_s"] is not None:
            lines.append(f"limit_req_zone $binary_remote_addr zone={rate_zone(entry['domain'])}:10m "
                         f"rate={entry['rate_per_s']}r/s;")
    return "\n".join(lines) + "\n"


def desired_state(site: Site) -> dict[str, Any]:
    entries = site["proxy_hosts"]
    lists: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry["access"]:
            lists.setdefault(access_list_name(entry["access"]), access_list(site, entry["access"]))
    return {
        "format": FORMAT,
        "access_lists": list(lists.values()),
        "proxy_hosts": [proxy_host(site, entry) for entry in entries],
        "http_top": http_top(entries),
    }


def desired_state_json(site: Site) -> str:
    return json.dumps(desired_state(site), indent=2) + "\n"


def check_targets(site: Site, definitions: Mapping[str, ImageDefinition]) -> None:
    """Each target port must be open to the proxy's address in the target role's firewall matrix
    (images/ROLE.yaml ports): otherwise the host would be declared and time out."""
    source = str(ipaddress.IPv4Interface(site.host(NPM_ROLE).address).ip)
    for i, entry in enumerate(site["proxy_hosts"]):
        if not allowed(definitions[entry["to"]], site.zones, source, entry["port"]):
            raise RenderError(
                f"{site.path}: proxy_hosts[{i}]: {entry['to']} port {entry['port']} is not open to the {NPM_ROLE} "
                f"({source}) in images/{entry['to']}.yaml ports"
            )
