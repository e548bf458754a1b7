import Block
import TestSupport

/// An image made by qemu-img for a table-driven test: a name, and the shell that makes `img.qcow2`.
struct ImageCase: CustomStringConvertible, Sendable {
    var name: String
    var setup: String
    var description: String { name }

    /// Data, a second run of it and zeros written by qemu-io into `img.qcow2`.
    static let data = "qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 1536k 300k' -c 'write -z 2M 256k' img.qcow2 >/dev/null"
}

/// What a power loss can leave of a file whose changes were recorded (`HostFile.observeChanges`):
/// every change up to a barrier, and any subset of those between it and the next.
struct PowerLoss {
    let initial: [UInt8]
    let log: [HostFile.Change]

    /// Where each barrier is in the log; with `end`, the end of the log counts as one too.
    func barriers(end: Bool) -> [Int] {
        log.indices.filter { if case .barrier = log[$0] { true } else { false } } + (end ? [log.count] : [])
    }

    /// Calls `body` with the file as found after a power loss at each of `barriers`: in trial 0
    /// with nothing after the barrier, in the other trials with a random part of the changes up
    /// to the next barrier. `body` returns false to stop.
    func replay(at barriers: [Int], trials: Int, rng: inout SplitMix,
                _ body: (_ barrier: Int, _ trial: Int, _ file: [UInt8]) throws -> Bool) rethrows {
        var base = initial
        var applied = 0
        for (k, at) in barriers.enumerated() {
            for change in log[applied..<at] { Self.apply(change, to: &base) }
            applied = at
            let next = k + 1 < barriers.count ? barriers[k + 1] : log.count
            for trial in 0..<trials {
                var state = base
                if trial > 0 {
                    for change in log[at..<next] where Bool.random(using: &rng) { Self.apply(change, to: &state) }
                }
                guard try body(k, trial, state) else { return }
            }
        }
    }

    static func apply(_ change: HostFile.Change, to file: inout [UInt8]) {
        switch change {
        case .write(let offset, let bytes):
            let end = Int(offset) + bytes.count
            if end > file.count { file += [UInt8](repeating: 0, count: end - file.count) }
            file.replaceSubrange(Int(offset)..<end, with: bytes)
        case .zero(let offset, let length):
            let end = min(file.count, Int(offset + length))
            if Int(offset) < end { file.replaceSubrange(Int(offset)..<end, with: [UInt8](repeating: 0, count: end - Int(offset))) }
        case .barrier:
            break
        }
    }
}
