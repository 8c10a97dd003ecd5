#!/usr/bin/env bash
# Start a real Neo4j Community server in-process (neo4j-harness from Maven Central) with Bolt
# on a free 127.0.0.1 port and a generated password, and keep it running until stdin closes
# or Ctrl-C. Its first line of output is JSON: the Bolt URI and the owner-only env file that
# holds NEO4J_URI, NEO4J_USERNAME and NEO4J_PASSWORD (the password is never printed).
#
#   bash tools/neo4j/launcher.sh [--version 5.26.30|2026.08.1] [--dir DIR]
#
# The version defaults to the one docker-compose.yml pins. Releases from 2025 on need Java 21
# or newer: the first such JDK found (JAVA_HOME, then /usr/lib/jvm) runs them. Jars stay in
# Maven's local repository and the resolved classpath is cached, so a second start needs no
# network. Exit status 3 means no JDK or Maven fit the version (the tests then skip Neo4j).
# MOE_NEO4J_JAVA_OPTS adds JVM options (the test suite's short-lived servers use
# -XX:TieredStopAtLevel=1).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

version=""
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    *) echo "usage: launcher.sh [--version V] [--dir DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "$version" ]; then
  version=$(sed -n 's/^ *image: neo4j:\([0-9.]*\)-community.*/\1/p' "$here/../../docker-compose.yml")
fi
[ -n "$version" ] || { echo "launcher.sh: no --version and none pinned in docker-compose.yml" >&2; exit 2; }

java_major() {  # the major version of the java binary $1
  "$1" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1
}

need=17
case "$version" in 4.*|5.*) need=17 ;; *) need=21 ;; esac
java=""
for candidate in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java || true)" \
    $(ls -d /usr/lib/jvm/*/bin/java 2>/dev/null | sort -V -r); do
  [ -n "$candidate" ] && [ -x "$candidate" ] || continue
  major=$(java_major "$candidate")
  if [ -n "$major" ] && [ "$major" -ge "$need" ]; then java="$candidate"; break; fi
done
if [ -z "$java" ]; then
  echo "launcher.sh: Neo4j $version needs Java $need or newer; none found (JAVA_HOME, PATH, /usr/lib/jvm)" >&2
  exit 3
fi
command -v mvn >/dev/null || { echo "launcher.sh: Maven (mvn) is not installed" >&2; exit 3; }

cache="${XDG_CACHE_HOME:-$HOME/.cache}/moe-pipeline/neo4j"
mkdir -p "$cache"
classpath_file="$cache/classpath-$version.txt"
complete() {  # every jar of the cached classpath is still in Maven's repository
  [ -s "$classpath_file" ] || return 1
  local jar
  while IFS= read -r jar; do [ -f "$jar" ] || return 1; done < <(tr ':' '\n' <"$classpath_file")
}
if ! complete; then
  partial=$(mktemp "$cache/classpath-$version.XXXXXX")  # two cold starts write two files
  JAVA_HOME="$(dirname "$(dirname "$(readlink -f "$java")")")" \
    mvn -q -B -f "$here/pom.xml" -Dneo4j.version="$version" dependency:build-classpath \
    -Dmdep.outputFile="$partial" >"$cache/mvn-$version.log" 2>&1 \
    || { rm -f "$partial"; echo "launcher.sh: Maven could not resolve neo4j-harness $version (see $cache/mvn-$version.log)" >&2; exit 3; }
  mv "$partial" "$classpath_file"
fi

if [ -z "$dir" ]; then
  dir=$(mktemp -d "${TMPDIR:-/tmp}/moe-neo4j-XXXXXX")  # 0700, removed when this ends
  trap 'rm -rf "$dir"' EXIT
else
  mkdir -p "$dir"  # the user's folder: its mode is theirs; the env file is 0600 itself
fi
# The launcher compiled once per source and JDK (javac takes seconds of two cores; running
# the .java file directly compiled it on every start), where the JDK has javac; else the
# source file runs as it is.
main=(-cp "$(cat "$classpath_file")" "$here/Launcher.java")
javac="$(dirname "$(readlink -f "$java")")/javac"
if [ -x "$javac" ]; then
  key=$( { cat "$here/Launcher.java"; "$java" -version 2>&1; cat "$classpath_file"; } | sha256sum | cut -c1-16)
  classes="$cache/launcher-$key"
  if [ ! -f "$classes/Launcher.class" ]; then
    building=$(mktemp -d "$cache/launcher-build.XXXXXX")
    if "$javac" -nowarn -d "$building" -cp "$(cat "$classpath_file")" "$here/Launcher.java" \
        >"$cache/javac.log" 2>&1; then
      mv -T "$building" "$classes" 2>/dev/null || rm -rf "$building"  # another start won
    else
      rm -rf "$building"
    fi
  fi
  [ -f "$classes/Launcher.class" ] && main=(-cp "$classes:$(cat "$classpath_file")" Launcher)
fi
# Neo4j's own log lines go to stderr and its files; stdout carries only the ready line.
"$java" -Xms256m -Xmx1g -XX:+UseParallelGC ${MOE_NEO4J_JAVA_OPTS:-} --add-opens=java.base/java.nio=ALL-UNNAMED \
  --add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED \
  "${main[@]}" "$dir"
