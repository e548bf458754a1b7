#!/usr/bin/env bash
# Checks that every relative link in README.md and docs/ (docs/**/*.md) resolves: the file or
# directory exists, and an #anchor names a heading (GitHub's slugs) or an <a id/name> of the
# target page. Links with a scheme (https:, mailto:) are not fetched. Code (fenced blocks and
# inline `code`) is skipped. Prints one line per broken link and exits 1 if there is any.
# Usage: scripts/check-doc-links.sh [FILE.md...]   (default: README.md and docs/)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'EOF'
import os, re, sys

def pages():
    if sys.argv[1:]:
        return sys.argv[1:]
    found = ['README.md']
    for root, dirs, files in os.walk('docs'):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith('.md')]
    return found

FENCE = re.compile(r'^\s*(```|~~~)')

def prose(text):
    """The lines outside fenced code, with inline code removed."""
    fenced = False
    for number, line in enumerate(text.split('\n'), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, re.sub(r'(`+)(.+?)\1', lambda m: ' ' * len(m.group(0)), line)

def slug(heading):
    """GitHub's anchor for a heading: its text lower-cased, without markup and punctuation,
    spaces made hyphens (github-slugger)."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)   # links and images: their text
    text = re.sub(r'<[^>]+>', '', text)                        # inline HTML
    text = text.replace('`', '').lower()
    text = re.sub(r'[^\w\- ]', '', text)                       # \w keeps letters, digits, _
    return text.replace(' ', '-')

anchor_cache = {}
def anchors(path):
    if path not in anchor_cache:
        found, counts = set(), {}
        fenced = False
        for line in open(path, encoding='utf-8').read().split('\n'):
            if FENCE.match(line):
                fenced = not fenced
                continue
            if fenced:
                continue
            m = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
            if m:
                base = slug(m.group(1))
                n = counts.get(base, 0)
                counts[base] = n + 1
                found.add(base if n == 0 else f'{base}-{n}')
            for m in re.finditer(r'<a\s+(?:id|name)="([^"]+)"', line):
                found.add(m.group(1))
        anchor_cache[path] = found
    return anchor_cache[path]

LINK = re.compile(r'\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
REFERENCE = re.compile(r'^\s*\[[^\]]+\]:\s*(\S+)')

broken = 0
checked = 0
for page in pages():
    text = open(page, encoding='utf-8').read()
    base = os.path.dirname(page)
    for number, line in prose(text):
        targets = [m.group(1) for m in LINK.finditer(line)]
        m = REFERENCE.match(line)
        if m:
            targets.append(m.group(1))
        for target in targets:
            if re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target):
                continue
            checked += 1
            path, _, anchor = target.partition('#')
            resolved = os.path.normpath(os.path.join(base, path)) if path else page
            problem = None
            if not os.path.exists(resolved):
                problem = f'{resolved} does not exist'
            elif anchor and os.path.isdir(resolved):
                problem = f'#{anchor} on a directory'
            elif anchor and resolved.endswith('.md') and anchor not in anchors(resolved):
                problem = f'no heading #{anchor} in {resolved}'
            if problem:
                broken += 1
                print(f'{page}:{number}: {target}: {problem}')

sys.stdout.flush()
print(f'check-doc-links: {checked} links checked, {broken} broken', file=sys.stderr)
sys.exit(1 if broken else 0)
EOF
