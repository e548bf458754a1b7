import Locking

/// The engine's only cache: metadata clusters (L1 chunks, L2 tables) and decoded compressed
/// clusters, bounded in bytes across every image that shares it. Sharded so that threads reading
/// different images or different parts of one image rarely meet on a lock; each shard evicts with
/// CLOCK (a hit only sets a bit, no list surgery under the lock).
public final class BlockCache: Sendable {
    public struct Key: Hashable, Sendable {
        /// `table`: a table of another format's reader (vmdk grain tables, vhd BAT blocks, ...).
        public enum Kind: UInt8, Sendable { case l1, l2, decoded, refcountTable, refcountBlock, table }
        var file: UInt64
        var offset: UInt64
        var kind: Kind
    }

    private let shards: [Locked<Shard>]
    public let capacity: Int

    public init(capacityBytes: Int, shardCount: Int = 16) {
        capacity = capacityBytes
        let perShard = max(capacityBytes / shardCount, 0)
        shards = (0..<shardCount).map { _ in Locked(Shard(capacity: perShard)) }
    }

    /// The cached block for `key`, or the one `load` produces (inserted when it fits a shard).
    /// `load` runs outside any lock; two threads that miss together both load, and one wins.
    public func block(_ key: Key, load: () throws -> CachedBlock) throws -> CachedBlock {
        try block(key, load: load, insertIf: { true })
    }

    /// As `block(_:load:)`, inserting what `load` produced only if `insertIf`, asked under the
    /// lock that `replace` takes too, still says so (see `Qcow2Image.metadataBlock`).
    func block(_ key: Key, load: () throws -> CachedBlock, insertIf: () -> Bool) throws -> CachedBlock {
        if let hit = cached(key) { return hit }
        let block = try load()
        shard(key).withLock { shard in
            if insertIf() { shard.insert(key, block) }
        }
        return block
    }

    /// Puts `block` in place of whatever is cached for `key` (a writer wrote a new version).
    public func replace(_ key: Key, with block: CachedBlock) {
        shard(key).withLock { shard in
            shard.remove(key)
            shard.insert(key, block)
        }
    }

    /// The block for `key` if it is cached now.
    public func cached(_ key: Key) -> CachedBlock? {
        shard(key).withLock { $0.lookup(key) }
    }

    private func shard(_ key: Key) -> Locked<Shard> {
        shards[Int(truncatingIfNeeded: UInt(bitPattern: key.hashValue) % UInt(shards.count))]
    }

    /// Bytes held now, for tests and statistics.
    public var bytesUsed: Int { shards.reduce(0) { total, shard in total + shard.withLock { $0.used } } }

    struct Shard: ~Copyable {
        struct Slot {
            var key: Key
            var block: CachedBlock
            var referenced: Bool
        }
        let capacity: Int
        var used = 0
        var index: [Key: Int] = [:]
        var slots: [Slot?] = []
        var free: [Int] = []
        var hand = 0

        init(capacity: Int) { self.capacity = capacity }

        mutating func lookup(_ key: Key) -> CachedBlock? {
            guard let i = index[key] else { return nil }
            slots[i]!.referenced = true
            return slots[i]!.block
        }

        mutating func insert(_ key: Key, _ block: CachedBlock) {
            let size = block.bytes.count
            guard size <= capacity, index[key] == nil else { return }
            while used + size > capacity { evictOne() }
            let slot = Slot(key: key, block: block, referenced: false)
            let i: Int
            if let reused = free.popLast() { i = reused; slots[i] = slot } else { i = slots.count; slots.append(slot) }
            index[key] = i
            used += size
        }

        mutating func remove(_ key: Key) {
            guard let i = index.removeValue(forKey: key) else { return }
            used -= slots[i]!.block.bytes.count
            slots[i] = nil
            free.append(i)
        }

        /// Terminates: each pass clears reference bits, so the second pass finds a victim.
        private mutating func evictOne() {
            while true {
                if hand >= slots.count { hand = 0 }
                defer { hand += 1 }
                guard var slot = slots[hand] else { continue }
                if slot.referenced {
                    slot.referenced = false
                    slots[hand] = slot
                    continue
                }
                index[slot.key] = nil
                used -= slot.block.bytes.count
                slots[hand] = nil
                free.append(hand)
                return
            }
        }
    }
}

/// An immutable cached block in memory of its own, so that a reply can hand its address to the
/// kernel; shared by reference with readers that hold it beyond eviction.
public final class CachedBlock: @unchecked Sendable {
    // SAFETY: written once in init, never mutated, freed in deinit.
    public let bytes: UnsafeRawBufferPointer

    /// `count` bytes that `fill` writes in place (a read, a decompression): no copy, no zeroing.
    init(count: Int, fill: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows {
        let storage = BlockMemory.allocate(count)
        do {
            try fill(UnsafeMutableRawBufferPointer(start: storage, count: count))
        } catch let inUse as BufferStillInUse {
            // SAFETY: I/O still in flight may write into the memory: whoever started it frees it.
            let pointer = UnsafeSendablePointer(storage)
            inUse.handOff { BlockMemory.release(pointer.value, count: count) }
            throw inUse.underlying
        } catch {
            BlockMemory.release(storage, count: count)
            throw error
        }
        bytes = UnsafeRawBufferPointer(start: storage, count: count)
    }

    /// A copy of `bytes`.
    convenience init(copying bytes: [UInt8]) {
        self.init(count: bytes.count) { target in bytes.withUnsafeBytes { target.copyMemory(from: $0) } }
    }

    /// `count` bytes of `file` at `offset`, all inside the file.
    static func read(_ file: HostFile, at offset: UInt64, count: Int) throws -> CachedBlock {
        try CachedBlock(count: count) { try file.read(into: $0, at: offset) }
    }

    deinit { BlockMemory.release(UnsafeMutableRawPointer(mutating: bytes.baseAddress!), count: bytes.count) }

    func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R { try body(bytes) }
}

/// Thrown by a `ReadPlan.appendRead` fill whose asynchronous I/O did not finish in time and may
/// still write into the buffer: instead of freeing it, the plan passes the job of freeing it to
/// `handOff`, which runs it once that I/O has ended; `underlying` is thrown on.
public struct BufferStillInUse: Error {
    public var underlying: any Error
    public var handOff: @Sendable (_ release: @escaping @Sendable () -> Void) -> Void

    public init(_ underlying: any Error, handOff: @escaping @Sendable (_ release: @escaping @Sendable () -> Void) -> Void) {
        self.underlying = underlying
        self.handOff = handOff
    }
}

private struct UnsafeSendablePointer: @unchecked Sendable {
    let value: UnsafeMutableRawPointer
    init(_ value: UnsafeMutableRawPointer) { self.value = value }
}
