#!/usr/bin/env bash
# shellcheck shell=bash
# Reads infra/services.toml, Keel's registry of services, for the dev scripts.
#
# Sourced by lib.sh (so every infra/dev script knows the registered services), or run:
#   infra/dev/registry.sh dump            every entry, resolved (what the registry test compares
#                                         with keelctl's reading of the same file)
#   infra/dev/registry.sh services        service names, in start order
#   infra/dev/registry.sh db-services     those with a database
#   infra/dev/registry.sh psql-vars       the psql -v arguments infra/postgres/init.sql needs
#
# Why a reader in bash rather than a TOML library: `make deps` runs before anything is built and
# must work on a fresh machine, so it cannot ask keelctl; Python would be one more thing to
# install. The registry keeps to a TOML subset (its header says which) and this reader dies on
# any line outside it, so it never misreads silently; the registry test proves that it and
# keelctl's TOML parser read the same values.
#
# What sourcing defines (KEELDEV_ prefix: the services reject unknown KEEL_* variables):
#   KEELDEV_SERVICES       names in file order        KEELDEV_DB_SERVICES  those with a database
#   KEELDEV_ROLE_PREFIXES  [[roles]] prefixes          KEELDEV_REG          name.field -> value
#   <NAME>_<KIND>_PORT     one per service port, exported; a value already in the environment
#                          wins (`CHECKOUT_HTTP_PORT=9080 make dev`)
# and the functions reg_get, reg_port, reg_port_var, reg_expand, reg_has.

: "${KEELDEV_ROOT:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
: "${KEELDEV_REGISTRY:=$KEELDEV_ROOT/infra/services.toml}"

KEELDEV_SERVICES=()
KEELDEV_DB_SERVICES=()
KEELDEV_ROLE_PREFIXES=()
declare -gA KEELDEV_REG=()

reg_die() {
    printf '[keel] ERROR: %s\n' "$*" >&2
    exit 1
}

# reg_get SERVICE FIELD: the raw value (arrays and key lists space-separated).
reg_get() { printf '%s\n' "${KEELDEV_REG[$1.$2]-}"; }

# reg_has SERVICE FIELD: the boolean field is true.
reg_has() { [[ ${KEELDEV_REG[$1.$2]-} == true ]]; }

# reg_port_var SERVICE KIND: the variable holding that port (psp-sim http -> PSP_SIM_HTTP_PORT).
reg_port_var() {
    local v="${1}_${2}_PORT"
    v=${v//-/_}
    printf '%s\n' "${v^^}"
}

# reg_port SERVICE KIND: the port in use (the environment's value, else the registry's).
reg_port() {
    local var
    [[ -n ${KEELDEV_REG[$1.port.$2]-} ]] || reg_die "registry: service '$1' has no $2 port"
    var=$(reg_port_var "$1" "$2")
    printf '%s\n' "${!var}"
}

# reg_expand TEMPLATE: replaces every {service.kind} with that port.
reg_expand() {
    local s=$1 out="" port
    local re='^([^{]*)\{([a-z0-9-]+)\.([a-z0-9_]+)\}(.*)$'
    while [[ $s =~ $re ]]; do
        port=$(reg_port "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}") || exit 1
        out+="${BASH_REMATCH[1]}$port"
        s=${BASH_REMATCH[4]}
    done
    [[ $s != *[{}]* ]] || reg_die "registry: cannot expand '$1' (a brace that is not {service.kind})"
    printf '%s\n' "$out$s"
}

# _reg_value RAW: parses one value of the subset into REPLY (arrays: items space-separated;
# inline tables: "key=int" pairs space-separated). Fails on anything else.
_reg_value() {
    local raw=$1 inner item re_tail='[[:space:]]*(#.*)?$'
    local re_str="^\"([^\"\\\\]*)\"$re_tail" re_int="^([0-9]+)$re_tail" re_bool="^(true|false)$re_tail"
    local re_arr="^\\[([^]]*)\\]$re_tail" re_tab="^\\{([^}]*)\\}$re_tail"
    local re_item='^[[:space:]]*"([^"\\[:space:]]*)"[[:space:]]*$'
    local re_pair='^[[:space:]]*([a-z0-9_]+)[[:space:]]*=[[:space:]]*([0-9]+)[[:space:]]*$'
    REPLY=""
    if [[ $raw =~ $re_str || $raw =~ $re_int || $raw =~ $re_bool ]]; then
        REPLY=${BASH_REMATCH[1]}
    elif [[ $raw =~ $re_arr ]]; then
        inner=${BASH_REMATCH[1]}
        [[ $inner =~ ^[[:space:]]*$ ]] && return 0
        local -a items
        IFS=, read -r -a items <<<"$inner"
        for item in "${items[@]}"; do
            [[ $item =~ $re_item ]] || return 1
            REPLY+="${REPLY:+ }${BASH_REMATCH[1]}"
        done
    elif [[ $raw =~ $re_tab ]]; then
        inner=${BASH_REMATCH[1]}
        local -a items
        IFS=, read -r -a items <<<"$inner"
        for item in "${items[@]}"; do
            [[ $item =~ $re_pair ]] || return 1
            REPLY+="${REPLY:+ }${BASH_REMATCH[1]}=${BASH_REMATCH[2]}"
        done
    else
        return 1
    fi
}

_reg_parse() {
    local file=$1 line n=0 section="" svc="" key pair
    local re_kv='^([A-Za-z0-9_-]+)[[:space:]]*=[[:space:]]*(.*)$' re_end='[[:space:]]*(#.*)?$'
    [[ -r $file ]] || reg_die "registry: cannot read $file"
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line="${line#"${line%%[![:space:]]*}"}"
        [[ -z $line || $line == '#'* ]] && continue
        local where="$file:$n"
        if [[ $line =~ ^\[\[service\]\]$re_end ]]; then
            section="service" svc=""
            continue
        elif [[ $line =~ ^\[service\.env\]$re_end ]]; then
            [[ -n $svc ]] || reg_die "$where: [service.env] before a service's name"
            section="env"
            continue
        elif [[ $line =~ ^\[\[roles\]\]$re_end ]]; then
            section="roles"
            continue
        fi
        [[ $line =~ $re_kv ]] || reg_die "$where: not a line of the registry's TOML subset: $line"
        key=${BASH_REMATCH[1]}
        _reg_value "${BASH_REMATCH[2]}" || reg_die "$where: value outside the registry's TOML subset: $line"
        case $section:$key in
        service:name)
            [[ $REPLY =~ ^[a-z][a-z0-9-]*$ ]] || reg_die "$where: service name '$REPLY' must match [a-z][a-z0-9-]*"
            [[ -z ${KEELDEV_REG[$REPLY.name]-} ]] || reg_die "$where: service '$REPLY' is registered twice"
            svc=$REPLY
            KEELDEV_SERVICES+=("$svc")
            KEELDEV_REG[$svc.name]=$svc
            ;;
        service:ports)
            [[ -n $svc ]] || reg_die "$where: ports before the service's name"
            KEELDEV_REG[$svc.ports]=""
            for pair in $REPLY; do
                KEELDEV_REG[$svc.ports]+="${KEELDEV_REG[$svc.ports]:+ }${pair%%=*}"
                KEELDEV_REG[$svc.port.${pair%%=*}]=${pair#*=}
            done
            ;;
        service:database | service:broker | service:consumes | service:publishes | service:migrate | service:ready)
            [[ -n $svc ]] || reg_die "$where: $key before the service's name"
            KEELDEV_REG[$svc.$key]=$REPLY
            ;;
        env:KEEL_*)
            KEELDEV_REG[$svc.env]+="${KEELDEV_REG[$svc.env]:+ }$key"
            KEELDEV_REG[$svc.env.$key]=$REPLY
            ;;
        roles:prefix) KEELDEV_ROLE_PREFIXES+=("$REPLY") ;;
        *) reg_die "$where: unknown key '$key' in ${section:-the top level}" ;;
        esac
    done <"$file"

    local s kind var
    for s in "${KEELDEV_SERVICES[@]}"; do
        [[ -n ${KEELDEV_REG[$s.port.http]-} ]] || reg_die "registry: service '$s' has no http port"
        [[ -n ${KEELDEV_REG[$s.ready]-} ]] || reg_die "registry: service '$s' has no ready URL"
        reg_has "$s" database && KEELDEV_DB_SERVICES+=("$s")
        for kind in ${KEELDEV_REG[$s.ports]}; do
            var=$(reg_port_var "$s" "$kind")
            [[ -n ${!var:-} ]] || printf -v "$var" '%s' "${KEELDEV_REG[$s.port.$kind]}"
            # shellcheck disable=SC2163 # exports the variable named by $var, on purpose
            export "$var"
        done
    done
}

# _reg_dump: one `key=value` line per fact, ports and templates resolved, in a fixed order.
_reg_dump() {
    local s kind key
    for s in "${KEELDEV_SERVICES[@]}"; do
        echo "service=$s"
        for kind in $(tr ' ' '\n' <<<"${KEELDEV_REG[$s.ports]}" | sort); do
            echo "$s.port.$kind=$(reg_port "$s" "$kind")"
        done
        echo "$s.database=${KEELDEV_REG[$s.database]:-false}"
        echo "$s.broker=${KEELDEV_REG[$s.broker]:-false}"
        echo "$s.consumes=$(reg_get "$s" consumes)"
        echo "$s.publishes=$(reg_get "$s" publishes)"
        echo "$s.migrate=$(reg_get "$s" migrate)"
        echo "$s.ready=$(reg_expand "${KEELDEV_REG[$s.ready]}")"
        for key in $(tr ' ' '\n' <<<"${KEELDEV_REG[$s.env]-}" | sort); do
            echo "$s.env.$key=$(reg_expand "${KEELDEV_REG[$s.env.$key]}")"
        done
    done
    for s in "${KEELDEV_ROLE_PREFIXES[@]}"; do
        echo "roles=$s"
    done
}

_reg_parse "$KEELDEV_REGISTRY"

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
    dump) _reg_dump ;;
    services) printf '%s\n' "${KEELDEV_SERVICES[@]}" ;;
    db-services) printf '%s\n' "${KEELDEV_DB_SERVICES[@]}" ;;
    psql-vars)
        printf -- '-v\nservices=%s\n-v\nextra_roles=%s\n' \
            "$(IFS=,; echo "${KEELDEV_DB_SERVICES[*]}")" "$(IFS=,; echo "${KEELDEV_ROLE_PREFIXES[*]}")"
        ;;
    *)
        echo "usage: $0 dump|services|db-services|psql-vars" >&2
        exit 64
        ;;
    esac
fi
