#if canImport(Glibc)
import Glibc
#endif
import Foundation
import FuseKit
import Pools
import Block

/// Checks everything that can be checked before mounting, so that each failure gets one clear
/// message and nothing is left mounted; then serves the pool until unmounted.
public enum Mounter {
    public static func mount(source: String, mountpoint: String, options: MountOptions, foreground: Bool) throws {
        if !foreground { closeInheritedDescriptors() }
        guard access("/dev/fuse", R_OK | W_OK) == 0 else { throw MountError.noFuseDevice }
        let pool = try openPool(source, options: options)
        let target = try checkMountpoint(mountpoint)
        // Held until everything below is done, so that `poolfs unmount` can wait for it.
        let lock = MountLock.hold(target)
        defer { if let lock { close(lock) } }
        Log.configure(foreground: foreground)
        try pool.prepare()
        // Runs in the process that served the mount (the daemon), or here when mounting failed.
        defer { for failure in pool.release() { Log.error(failure) } }

        if options.cow {
            var st = stat()
            guard stat(options.cacheDirectory, &st) == 0, st.st_mode & S_IFMT == S_IFDIR, access(options.cacheDirectory, W_OK) == 0 else {
                throw MountError.badOption("cache_dir=\(options.cacheDirectory): not a writable directory")
            }
        }
        if options.rw, let refusal = pool.writeRefusal { throw MountError.badOption("rw: \(refusal)") }
        if let problem = pool.problem { Log.warning(problem) }
        let store = VolumeStore(pool: pool, cache: BlockCache(capacityBytes: options.cacheSize), writesImages: options.rw)
        // Whatever is still open for writing when the mount ends is flushed and closed.
        defer { store.closeWriters() }
        // Spill files are made in cache_dir, which must be absolute once the daemon is in /.
        let cow = options.cow ? CowStore(memoryLimit: options.cowMemory, spillDirectory: absolute(options.cacheDirectory)) : nil
        let kernelCache = KernelCache()
        let filesystem = PoolFileSystem(store: store, cow: cow, passthrough: options.passthrough, kernelCache: kernelCache)
        var configuration = FuseServer.Configuration()
        configuration.foreground = foreground
        configuration.threads = options.threads
        configuration.maxReadahead = options.readahead
        configuration.maxRead = options.maxRead
        let readahead = options.readahead
        configuration.readaheadApplied = { applied in
            if !applied {
                Log.info("readahead stays at the kernel's 128 KiB: raising it to \(readahead >> 10) KiB needs root")
            }
        }
        configuration.splice = options.splice
        configuration.kernelCache = kernelCache
        configuration.passthrough = options.passthrough && !options.cow
        // Writable files only: a read-only mount gets no writes, so the kernel asks nothing before them.
        configuration.handleKillPriv = options.rw || options.cow
        configuration.directIO = (options.rw || options.cow) && !options.cachedWrites
        configuration.killPrivDecided = { asked in
            Log.info(asked ? "writes: the daemon handles setuid/setgid clearing (FUSE_HANDLE_KILLPRIV_V2)"
                           : "writes: the kernel does not offer FUSE_HANDLE_KILLPRIV_V2 (a GETXATTR before each write)")
        }
        configuration.passthroughDecided = { unavailable in
            Log.info(unavailable.map { "reads of raw volumes: through the daemon: \($0)" } ?? "reads of raw volumes: FUSE passthrough")
        }
        let fsname = ("poolfs:" + pool.displayName).replacingOccurrences(of: ",", with: "\\,")
        configuration.options = (options.cow || options.rw ? [] : ["ro"]) + ["fsname=\(fsname)", "subtype=poolfs"] + options.fuseOptions
        let server = FuseServer(filesystem: filesystem, configuration: configuration)
        try server.run(mountpoint: target) {
            Log.info("mounted \(pool.displayName) at \(target)")
            if !options.passthrough {
                Log.info("reads of raw volumes: through the daemon: -o nopassthrough")
            } else if options.cow {
                Log.info("reads of raw volumes: through the daemon: -o cow (writes go to the overlay)")
            }
        }
        Log.info("unmounted \(target)")
    }

    static func absolute(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// A daemon keeps no descriptor it inherited beyond stdin, stdout and stderr (which
    /// fuse_daemonize points at /dev/null): an inherited pipe or socket would make whoever
    /// started us wait for the daemon's whole life.
    static func closeInheritedDescriptors() {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") else { return }
        for fd in entries.compactMap({ Int32($0) }) where fd > 2 {
            close(fd)  // includes the directory's own descriptor, already closed: EBADF is harmless
        }
    }

    /// The mountpoint's real path: it must exist, be a directory, and not be mounted on already.
    static func checkMountpoint(_ path: String) throws -> String {
        var st = stat()
        guard stat(path, &st) == 0 else {
            if errno == ENOTCONN {
                throw MountError.mountpoint("mountpoint \(path) is a dead FUSE mount: run 'fusermount3 -u \(path)'")
            }
            throw MountError.mountpoint("mountpoint \(path) does not exist")
        }
        guard st.st_mode & S_IFMT == S_IFDIR else { throw MountError.mountpoint("mountpoint \(path) is not a directory") }
        guard let resolved = realpath(path, nil) else { throw MountError.mountpoint("mountpoint \(path) cannot be resolved") }
        let real = String(cString: resolved)
        free(resolved)
        if MountTable.current().entries.contains(where: { $0.mountpoint == real }) {
            throw MountError.mountpoint("mountpoint \(real) is busy: something is already mounted there")
        }
        return real
    }

    /// Unmounts, then waits until the daemon has flushed what was open for writing and exited.
    public static func unmount(_ mountpoint: String) throws {
        let target = absolute(mountpoint)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["fusermount3", "-u", mountpoint]
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw MountError.mountpoint("fusermount3 -u \(mountpoint) failed")
        }
        if !MountLock.waitForRelease(target, seconds: 60) {
            Log.warning("\(mountpoint) is unmounted, but its poolfs daemon is still finishing after 60 s")
        }
    }

    /// The pool SOURCE names, as `poolfs mount` and `poolfs ls` take it with their options.
    public static func openPool(_ source: String, options: MountOptions) throws -> any Pool {
        // POOLFS_LIBVIRT_STORAGE: where libvirt pool definitions are, for tests (as
        // POOLFS_LIBVIRT_DOMAINS is for domains).
        try PoolSource.open(source, type: options.type,
                            libvirtDirectory: ProcessInfo.processInfo.environment["POOLFS_LIBVIRT_STORAGE"] ?? PoolSource.libvirtStorageDirectory,
                            lvmMode: LogicalPool.Mode.forThisHost(noactivate: options.noactivate), writable: options.rw,
                            lvmCowSize: options.cowSize,
                            iscsi: try options.iscsiOptions(), rbd: options.rbdOptions(),
                            network: options.networkOptions(), trust: options.trust)
    }

    /// Opens every volume of the pool, for `poolfs ls`; and why the pool shows none, if it says.
    public static func reports(source: String, options: MountOptions) throws -> (reports: [VolumeReport], problem: String?) {
        let pool = try openPool(source, options: options)
        // The store, and what it opened, goes before the pool is released: an RBD pool waits in
        // release() for its image handles to close.
        let reports = {
            let store = VolumeStore(pool: pool, cache: BlockCache(capacityBytes: 16 << 20), logsFailures: false)
            return VolumeReport.make(store.volumeNames().compactMap { store.volume($0) })
        }()
        for failure in pool.release() { Log.error(failure) }
        return (reports, pool.problem)
    }
}

extension MountOptions {
    /// The iSCSI options, with the CHAP secret read from its file now (never from the command
    /// line, so it is not in ps; a trailing newline is not part of it).
    func iscsiOptions() throws -> ISCSIPool.Options {
        var secret: String?
        if let file = chapSecretFile {
            guard let data = FileManager.default.contents(atPath: file), var text = String(data: data, encoding: .utf8) else {
                throw MountError.badOption("chap_secret_file=\(file): cannot be read")
            }
            while text.hasSuffix("\n") || text.hasSuffix("\r") { text.removeLast() }
            guard !text.isEmpty else { throw MountError.badOption("chap_secret_file=\(file): is empty") }
            secret = text
        }
        return ISCSIPool.Options(initiator: initiator, chapUser: chapUser, chapSecret: secret)
    }

    /// The RBD options: the secret stays in its keyring file, which librados reads.
    func networkOptions() -> NetworkPoolOptions {
        var options = NetworkPoolOptions()
        options.timeout = netTimeout
        return options
    }

    func rbdOptions() -> RBDPool.Options {
        var options = RBDPool.Options(confFile: cephConf, id: cephID, keyring: keyring, monHost: monHost)
        options.timeout = rbdTimeout
        return options
    }
}
