# Install wheelhouse chunks (offline/build_wheelhouse.sh) into /tmp/site on an air-gapped
# GPU machine and put it on PYTHONPATH. SOURCE it (it exports variables):
#
#   . offline/install.sh [CHUNKDIR ...] || exit 1
#
# With no arguments it installs every .whl/chunk* folder present in the working tree.
# Idempotent: a chunk already installed (same MANIFEST.txt) is skipped, so successive
# calls on the same warm machine can each carry and add one chunk.  Each chunk is
# installed by pip into a fresh temporary target and then merged into the site folder,
# so later chunks never wipe files of earlier ones (pip --target --upgrade would).
# Returns non-zero if pip failed, or (with SGL_REQUIRE_ALL=1) if some chunk named in a
# MANIFEST.txt is still missing.  Prints what is installed.
#
# Env: SGL_SITE (default /tmp/site), SGL_REQUIRE_ALL (default 0).

_sgl_install() {
  local site="${SGL_SITE:-/tmp/site}" d name stamp tmp t0 rc=0
  export PIP_ROOT_USER_ACTION=ignore
  mkdir -p "$site/.installed"
  local dirs=("$@")
  if [ ${#dirs[@]} -eq 0 ]; then
    for d in .whl/chunk*; do [ -d "$d" ] && dirs+=("$d"); done
  fi
  for d in "${dirs[@]}"; do
    d="${d%/}"; name="$(basename "$d")"; stamp="$site/.installed/$name"
    if [ ! -f "$d/MANIFEST.txt" ]; then echo "[device_install] $d: no MANIFEST.txt, skipped" >&2; continue; fi
    if [ -f "$stamp" ] && cmp -s "$stamp" "$d/MANIFEST.txt"; then
      echo "[device_install] $name already installed"; continue
    fi
    t0=$(date +%s)
    tmp="$(mktemp -d /tmp/sgl_site_tmp.XXXXXX)"
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
         --disable-pip-version-check --target "$tmp" "$d"/*.whl; then
      cp -a "$tmp"/. "$site"/ && cp "$d/MANIFEST.txt" "$stamp"
      echo "[device_install] $name installed in $(( $(date +%s) - t0 )) s ($(grep -vc '^#' "$d/MANIFEST.txt") wheels)"
    else
      echo "[device_install] pip failed for $name" >&2; rc=1
    fi
    rm -rf "$tmp"
  done
  # which chunks exist in all, which are installed
  local all="" have missing=""
  all="$(cat "$site"/.installed/* "${dirs[@]/%//MANIFEST.txt}" 2>/dev/null | sed -n 's/.*all chunks: //p' | tr ' ' '\n' | sort -u)"
  have="$(ls "$site/.installed" 2>/dev/null | sort -u)"
  for d in $all; do echo "$have" | grep -qx "$d" || missing="$missing $d"; done
  echo "[device_install] site=$site installed: $(echo $have) missing:${missing:- none}"
  if [ -n "$missing" ] && [ "${SGL_REQUIRE_ALL:-0}" = 1 ]; then rc=1; fi
  case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}";; esac
  case ":$PATH:" in *":$site/bin:"*) ;; *) export PATH="$site/bin:$PATH";; esac
  return $rc
}
_sgl_install "$@"
