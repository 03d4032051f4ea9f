# Sourced by .ci/run. Gives the billing tests a real PostgreSQL and WeasyPrint its system libraries.
#
# Installs Debian's postgresql package when no server binaries are present, starts a throwaway cluster
# (trust auth, fsync off, its own directory under /tmp) on the first free port from 55432 as the postgres
# user, exports OCS_TEST_POSTGRES_URL, and stops the cluster when the calling shell exits. Nothing here is
# fatal: without a server the PostgreSQL variants of the billing tests are skipped with a visible reason.

ocs_apt_install() {  # packages...: install what is missing (root only; apt-get update once)
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "postgres.sh: cannot install ${missing[*]} (not root or no apt-get)" >&2
        return 1
    fi
    if [ -z "${OCS_APT_UPDATED:-}" ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        OCS_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1
}

ocs_start_postgres() {
    local bin dir port runas=()
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        ocs_apt_install postgresql || { echo "postgres.sh: PostgreSQL not installed; its tests will skip" >&2; return 0; }
    fi
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    dir=$(mktemp -d /tmp/ocs-pg.XXXXXX)
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
        chown postgres "$dir"
        runas=(runuser -u postgres --)
    fi
    if ! "${runas[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1; then
        echo "postgres.sh: initdb failed (see $dir/initdb.log); PostgreSQL tests will skip" >&2
        return 0
    fi
    for port in 55432 55433 55434 55435 55436; do
        if "${runas[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off" \
            start >/dev/null 2>&1; then
            export OCS_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
            OCS_PG_STOP="${runas[*]} $bin/pg_ctl -D $dir/data -m fast stop"
            trap 'eval "$OCS_PG_STOP" >/dev/null 2>&1 || true' EXIT
            echo "postgres.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on port $port"
            return 0
        fi
    done
    echo "postgres.sh: could not start PostgreSQL (see $dir/server.log); its tests will skip" >&2
    return 0
}

# WeasyPrint (PDF invoices) needs Pango from the system
ocs_apt_install libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core || \
    echo "postgres.sh: Pango libraries missing; PDF invoice tests will skip" >&2
ocs_start_postgres
