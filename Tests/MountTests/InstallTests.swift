import Foundation
import TestSupport
import Testing

/// What `make install` puts in place, installed from the built binary by the script the Makefile
/// runs (scripts/install.sh), into a scratch DESTDIR: the man page and the shell completions.
/// `make install` itself builds in release mode (a minute or more); the man page is made here by the tool
/// that the Makefile's GenerateManual plugin runs, generate-manual, which `make test` builds.
@Suite("make install")
struct InstallTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    static let generateManual = URL(fileURLWithPath: Binary.path).deletingLastPathComponent().appendingPathComponent("generate-manual").path

    /// Entries of the man page's lists, each the first word of a line: every pool type, and every
    /// `-o` option that MountOptions.parse takes.
    static let entries = [
        "dir", "logical", "zfs", "disk", "iscsi",
        "ro", "rw", "cow", "cow_memory=SIZE", "cache_dir=DIR", "type=TYPE", "noactivate", "initiator=IQN",
        "chap_user=NAME", "chap_secret_file=FILE", "cache_size=SIZE", "threads=N", "readahead=SIZE", "max_read=SIZE",
        "nosplice", "cached_writes", "-o cow", "-o rw",
        "VOLUME", ".snapshots/VOLUME/SNAPSHOT", ".partitions/VOLUME/partN", ".partitions/.snapshots/VOLUME/SNAPSHOT/partN",
        "user.poolfs.format,", "user.poolfs.error", "user.poolfs.partition_table,", "user.poolfs.iscsi.target,",
    ]
    /// And words anywhere in it.
    static let words = [
        "fs and netfs", "iscsi://HOST[:PORT]/IQN", "unit:0:0:LUN", "sda1", "loop0p1", "part1", "/etc/libvirt/storage",
        "allow_other", "default_permissions", "poolfs mount", "poolfs unmount", "poolfs ls",
    ]

    @Test func installsManPageAndCompletionsAndUninstallsThem() throws {
        try #require(FileManager.default.isExecutableFile(atPath: Self.generateManual),
                     "\(Self.generateManual) is not built: swift build --product generate-manual (make test does)")
        let scratch = try Scratch()
        try scratch.sh("mkdir man && '\(Self.generateManual)' '\(Binary.path)' --output-directory man")
        try scratch.sh("'\(Self.root)/scripts/install.sh' install '\(Binary.path)' man \"$PWD/dest\" /usr")

        let installed = ["usr/bin/poolfs", "sbin/mount.fuse.poolfs", "usr/share/man/man1/poolfs.1",
                         "usr/share/bash-completion/completions/poolfs", "usr/share/zsh/site-functions/_poolfs",
                         "usr/share/fish/vendor_completions.d/poolfs.fish"]
        for file in installed {
            let size = (try? FileManager.default.attributesOfItem(atPath: scratch.path("dest/" + file))[.size] as? Int) ?? 0
            #expect(size > 0, "\(file) is installed and not empty")
        }
        #expect(try scratch.sh("grep '^POOLFS=' dest/sbin/mount.fuse.poolfs") == "POOLFS=\"/usr/bin/poolfs\"\n")

        // The page is valid mdoc (mandoc finds no error: no help text line begins with a macro's dot)
        // and man-db renders it. (Blank lines and sentences ending mid-line are only warnings.)
        let lint = scratch.attempt("mandoc -T lint -W error dest/usr/share/man/man1/poolfs.1")
        #expect(lint.ok && lint.output.isEmpty, "mandoc -T lint: \(lint.output)")
        let page = try scratch.sh("MANWIDTH=80 man -l dest/usr/share/man/man1/poolfs.1 2>/dev/null | col -b")
        #expect(page.contains("POOLFS(1)") && page.contains("NAME") && page.contains("SYNOPSIS"), "\(page.prefix(400))")
        // groff hyphenates and may break a word at a line end: compare with the text unwrapped.
        let lines = page.replacingOccurrences(of: "\u{2010}", with: "-").split(separator: "\n")
        let starts = Set(lines.map { line in
            let words = line.split(whereSeparator: \.isWhitespace)
            return words.first == "-o" && words.count > 1 ? "-o " + words[1] : String(words.first ?? "")
        })
        for entry in Self.entries {
            let listed = starts.contains(entry)
            #expect(listed, "the man page has an entry for \(entry)")
        }
        let text = lines.joined(separator: " ").split(whereSeparator: \.isWhitespace).joined(separator: " ")
        for word in Self.words {
            let mentioned = text.contains(word)
            #expect(mentioned, "the man page mentions \(word)")
        }

        let bash = try scratch.sh("bash -c 'source dest/usr/share/bash-completion/completions/poolfs && complete -p poolfs'")
        #expect(bash.contains("poolfs"), "\(bash)")
        // What bash offers after `poolfs mount --type `, as if Tab were pressed there.
        let offered = try scratch.sh("""
            bash -c 'source dest/usr/share/bash-completion/completions/poolfs
            COMP_LINE="poolfs mount --type "; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(poolfs mount --type ""); COMP_CWORD=3
            _poolfs poolfs "" --type; echo "${COMPREPLY[@]}"'
            """)
        #expect(offered == "dir fs netfs logical zfs disk iscsi iscsi-direct\n", "--type completes pool types: \(offered)")
        if scratch.attempt("command -v zsh").ok { try scratch.sh("zsh -n dest/usr/share/zsh/site-functions/_poolfs") }
        if scratch.attempt("command -v fish").ok { try scratch.sh("fish -n dest/usr/share/fish/vendor_completions.d/poolfs.fish") }

        try scratch.sh("'\(Self.root)/scripts/install.sh' uninstall \"$PWD/dest\" /usr")
        for file in installed {
            #expect(!FileManager.default.fileExists(atPath: scratch.path("dest/" + file)), "\(file) is uninstalled")
        }
    }
}
