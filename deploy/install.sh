#!/usr/bin/env bash
# Install what the project needs to run and test, skipping whatever is already there.
#
#   deploy/install.sh [python|redis|kafka|kcat|prometheus|all]...
#
# With no argument: python redis kafka kcat. "all" adds prometheus.
set -euo pipefail

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MAVEN_DEPENDENCY_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
apt_updated=0

apt_install() {
    local packages=("$@")
    if [[ $(id -u) -ne 0 ]]; then
        die "need root to apt-get install ${packages[*]} (or install them yourself)"
    fi
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -q -o DPkg::Lock::Timeout=120)
    if ((apt_updated == 0)); then
        log "apt-get update"
        "${apt[@]}" update >&2
        apt_updated=1
    fi
    log "apt-get install ${packages[*]}"
    "${apt[@]}" install -y --no-install-recommends "${packages[@]}" >&2
}

# install_binary BINARY PACKAGE...: install the packages unless BINARY is on PATH.
install_binary() {
    local binary=$1
    shift
    if command -v "$binary" >/dev/null; then
        log "$binary: present ($(command -v "$binary"))"
        return
    fi
    apt_install "$@"
    command -v "$binary" >/dev/null || die "$binary still missing after installing $*"
}

install_python() {
    local py="$DMP_VENV/bin/python"
    local stamp="$DMP_VENV/.dmp-pyproject.sha256"
    if ! "$py" -c '' 2>/dev/null; then
        command -v "$DMP_PYTHON" >/dev/null || apt_install python3 python3-venv
        # Debian splits ensurepip (needed by venv) into python3-venv.
        if ! "$DMP_PYTHON" -c 'import ensurepip' 2>/dev/null; then
            apt_install python3-venv
        fi
        "$DMP_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "$DMP_PYTHON is older than 3.11 (set DMP_PYTHON to a newer interpreter)"
        log "creating $DMP_VENV"
        rm -f "$stamp"
        "$DMP_PYTHON" -m venv --clear "$DMP_VENV"
    fi
    local want have=""
    # The C extensions (setup.py: segment_rules/*.c, dmp/*.c) are built by the same install,
    # so a change to any of them installs again.
    want=$(cat "$DMP_ROOT/pyproject.toml" "$DMP_ROOT/setup.py" "$DMP_ROOT"/segment_rules/*.c \
        "$DMP_ROOT"/dmp/*.c | sha256sum | cut -d' ' -f1)
    [[ -f $stamp ]] && have=$(<"$stamp")
    if [[ $want == "$have" ]]; then
        log "python: $DMP_VENV up to date with pyproject.toml and the C extensions"
        return
    fi
    # The C extensions: a compiler, and the interpreter's headers (Debian's
    # python3 keeps them in python3-dev; pyenv and python.org builds ship them).
    install_binary gcc gcc libc6-dev
    if ! "$py" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        apt_install python3-dev
    fi
    log "python: pip install -e .[dev] into $DMP_VENV"
    "$py" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    "$py" -m pip install -q --disable-pip-version-check -e "${DMP_ROOT}[dev]" >&2
    printf '%s\n' "$want" >"$stamp"
    log "python: done"
}

write_kafka_pom() {
    local dir=$1
    cat >"$dir/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Only a vehicle for dependency:copy-dependencies: the broker and its runtime jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.dmp</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$DMP_KAFKA_VERSION</version>
    </dependency>
    <!-- Kafka logs through slf4j 1.7; without this binding slf4j falls back to NOP. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$DMP_LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$DMP_LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

write_kafka_log4j() {
    local file=$1
    # kafka.logs.dir is set per state dir by kafka.sh; this file is shared between clones.
    cat >"$file" <<'EOF'
# Console (kafka.sh sends it to $DMP_STATE_DIR/kafka/server.log, fresh on each start)
# plus a rolling kafka.log that keeps the history across restarts.
status = warn
name = dmp-kafka
# Kafka logs its own shutdown from a shutdown hook; log4j's hook must not close the appenders first.
shutdownHook = disable

property.logdir = ${sys:kafka.logs.dir:-logs}
property.pattern = [%d] %p %m (%c)%n

appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = ${pattern}

appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = ${logdir}/kafka.log
appender.file.filePattern = ${logdir}/kafka.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = ${pattern}
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 4

rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
rootLogger.appenderRef.file.ref = FILE

# Every test creates and deletes topics; per-partition and per-segment lines drown the rest.
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.requestchannel.name = kafka.network.RequestChannel$
logger.requestchannel.level = WARN
logger.storage.name = org.apache.kafka.storage.internals
logger.storage.level = WARN
logger.log.name = kafka.log
logger.log.level = WARN
logger.cluster.name = kafka.cluster
logger.cluster.level = WARN
logger.fetcher.name = kafka.server.ReplicaFetcherManager
logger.fetcher.level = WARN
logger.alterlogdirs.name = kafka.server.ReplicaAlterLogDirsManager
logger.alterlogdirs.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
EOF
}

# Rewrite the logging config when this script's version of it differs (cheap, atomic).
refresh_kafka_log4j() {
    local tmp="$DMP_KAFKA_LOG4J.$$"
    write_kafka_log4j "$tmp"
    if cmp -s "$tmp" "$DMP_KAFKA_LOG4J"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$DMP_KAFKA_LOG4J"
        log "kafka: wrote $DMP_KAFKA_LOG4J"
    fi
}

install_kafka() {
    if compgen -G "$DMP_KAFKA_LIBS/kafka_2.13-$DMP_KAFKA_VERSION.jar" >/dev/null &&
        [[ -f $DMP_KAFKA_LOG4J ]]; then
        refresh_kafka_log4j
        log "kafka: $DMP_KAFKA_VERSION present in $DMP_KAFKA_HOME"
        return
    fi
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    command -v mvn >/dev/null || apt_install maven
    mkdir -p "$DMP_CACHE_DIR"
    # Two clones installing at once: the second waits, then finds the cache complete.
    exec {lock}>"$DMP_CACHE_DIR/.kafka-install.lock"
    flock "$lock"
    if compgen -G "$DMP_KAFKA_LIBS/kafka_2.13-$DMP_KAFKA_VERSION.jar" >/dev/null &&
        [[ -f $DMP_KAFKA_LOG4J ]]; then
        log "kafka: $DMP_KAFKA_VERSION installed meanwhile by another run"
        exec {lock}>&-
        return
    fi
    # Leftovers of a run killed outright (SIGKILL, power loss); only lock holders make them.
    rm -rf "$DMP_CACHE_DIR"/.kafka-*.??????
    local tmp
    tmp=$(mktemp -d "$DMP_CACHE_DIR/.kafka-$DMP_KAFKA_VERSION.XXXXXX")
    # An interrupted download must never leave a half cache behind: build aside, rename.
    # shellcheck disable=SC2064  # expand $tmp now, the local is gone when the trap fires
    trap "rm -rf '$tmp'" EXIT
    log "kafka: fetching $DMP_KAFKA_VERSION and its dependencies with Maven"
    write_kafka_pom "$tmp"
    # Quiet Maven 3.8 still prints stray colour codes: keep its output for failures only.
    if ! mvn -q -B -f "$tmp/pom.xml" "$MAVEN_DEPENDENCY_PLUGIN:copy-dependencies" \
        -DincludeScope=runtime -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1; then
        show_tail "$tmp/mvn.log"
        die "kafka: Maven could not fetch kafka_2.13:$DMP_KAFKA_VERSION"
    fi
    compgen -G "$tmp/libs/kafka_2.13-$DMP_KAFKA_VERSION.jar" >/dev/null ||
        die "kafka: Maven finished but kafka_2.13-$DMP_KAFKA_VERSION.jar is missing"
    write_kafka_log4j "$tmp/log4j2.properties"
    rm -f "$tmp/pom.xml" "$tmp/mvn.log"
    chmod 755 "$tmp"
    rm -rf "$DMP_KAFKA_HOME"
    mv -T "$tmp" "$DMP_KAFKA_HOME"
    trap - EXIT
    exec {lock}>&-
    log "kafka: installed $(find "$DMP_KAFKA_LIBS" -name '*.jar' | wc -l) jars in $DMP_KAFKA_HOME"
}

main() {
    local targets=("$@")
    if ((${#targets[@]} == 0)); then
        targets=(python redis kafka kcat)
    fi
    local target
    for target in "${targets[@]}"; do
        case $target in
        python) install_python ;;
        redis) install_binary redis-server redis-server ;;
        kafka) install_kafka ;;
        kcat) install_binary kcat kcat ;;
        prometheus) install_binary prometheus prometheus ;;
        all)
            main python redis kafka kcat prometheus
            ;;
        *) die "unknown target '$target' (python|redis|kafka|kcat|prometheus|all)" ;;
        esac
    done
}

main "$@"
