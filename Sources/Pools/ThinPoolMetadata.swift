import Block
import Locking

/// The metadata of a dm-thin pool (lvm2's `_tmeta` LV), read without device-mapper: the
/// superblock, the device details btree and the two-level data mapping btree. Sources: the
/// kernel's `drivers/md/dm-thin-metadata.c` (superblock, device details, block-time values) and
/// `drivers/md/persistent-data/` (`dm-btree-internal.h`, `dm-btree.c`, `dm-btree-spine.c` for
/// the node layout and validator, `dm-block-manager.c` for the checksum, `dm-space-map-disk.h`
/// for the space-map root). Every integer is little-endian; metadata blocks are 4096 bytes.
///
/// Superblock, block 0 (`struct thin_disk_superblock`, 364 bytes used):
///
///     0   csum u32          dm_bm_checksum(bytes 4..<4096, xor 160774)
///     4   flags u32         bit 0: needs_check
///     8   blocknr u64       0
///     16  uuid [16]
///     32  magic u64         27022010
///     40  version u32       1 or 2
///     44  time u32          snapshot counter; the low 24 bits of each mapping carry it
///     48  trans_id u64      the pool's committed transaction id (lvm2's `transaction_id`)
///     56  held_root u64     metadata snapshot (userspace), unused here
///     64  data_space_map_root [128]      `struct disk_sm_root`: nr_blocks u64 at 64 (data blocks
///                                        of the pool), nr_allocated, bitmap_root, ref_count_root
///     192 metadata_space_map_root [128]
///     320 data_mapping_root u64          top level of the mapping tree
///     328 device_details_root u64
///     336 data_block_size u32            512-byte sectors: 128 (64 KiB) ... 2097152 (1 GiB), × 128
///     340 metadata_block_size u32        sectors: 8
///     344 metadata_nr_blocks u64         at format time; not updated when `_tmeta` grows
///     352 compat_flags u32, 356 compat_ro_flags u32, 360 incompat_flags u32 (none supported)
///
/// Btree node, any other block (`struct btree_node`):
///
///     0   csum u32          dm_bm_checksum(bytes 4..<4096, xor 121107)
///     4   flags u32         INTERNAL_NODE 1, LEAF_NODE 2
///     8   blocknr u64       the block's own number
///     16  nr_entries u32
///     20  max_entries u32   32 + (8 + value_size) × max_entries ≤ 4096
///     24  value_size u32    8 in internal nodes (child block numbers)
///     28  padding u32
///     32  keys [max_entries] u64, strictly increasing over the first nr_entries
///     32 + 8 × max_entries  values [max_entries] of value_size bytes
///
/// An internal node's key i is a lower bound of every key under child i, and key i + 1 bounds
/// them above. The trees (leaf value sizes):
/// - device details (24): thin id → `struct disk_device_details` { mapped_blocks u64 at 0,
///   transaction_id u64 at 8, creation_time u32 at 16, snapshotted_time u32 at 20 };
/// - data mapping, top level (8): thin id → root block of that device's tree;
/// - data mapping, bottom level (8): virtual block → (data block << 24) | time (24 bits).
///   A snapshot is another thin id whose tree shares nodes and data blocks with its origin.
///
/// On hostile metadata nothing crashes, loops or allocates beyond a block: every block number is
/// checked against the size of the metadata device before it is read, every node is verified
/// (checksum, own number, entry counts, key order) when it is loaded, and every visit checks the
/// value size its tree needs, the keys against the parent's bounds, ancestors (loops) and depth.
public final class ThinPoolMetadata: Sendable {
    public static let blockSize = 4096
    /// Deeper than any real tree (a pool's trees have a handful of levels): a bound on descents.
    static let maxDepth = 64
    /// Verified nodes kept per pool: 2 MiB, whose leaves map up to 8 GiB at 64 KiB data blocks.
    public static let defaultCachedNodes = 512

    /// "vg/pool", for messages.
    public let name: String
    /// Bytes per data block.
    public let dataBlockSize: UInt64
    /// The superblock's trans_id.
    public let transactionID: UInt64
    /// Data blocks the pool's space map covers (`nr_blocks` of the data space map root).
    public let dataBlockCount: UInt64
    /// The kernel asked for `thin_check` (superblock flag 0); reads are still verified.
    public let needsCheck: Bool

    let superblock: ThinSuperblock
    let metadata: any BlockDevice
    /// Blocks of the metadata device: the bound of every block number.
    let metadataBlocks: UInt64
    let cache: ThinNodeCache

    /// `metadata` is the pool's _tmeta LV bytes. `expectedTransactionID`: lvm2's transaction_id of
    /// the pool (from `lvs -o transaction_id`); if lvm2's is ahead of the superblock's trans_id the
    /// pool has pending messages not yet committed: that throws. `name` ("vg/pool") is for messages.
    public init(metadata: any BlockDevice, expectedTransactionID: UInt64?, name: String,
                cachedNodes: Int = ThinPoolMetadata.defaultCachedNodes) throws {
        let blocks = metadata.size / UInt64(Self.blockSize)
        superblock = try ThinMetadataError.inPool(name) {
            guard blocks > 0 else { throw ThinMetadataError.metadataTooSmall(bytes: metadata.size) }
            let superblock = try ThinSuperblock.decode(try Self.readBlock(0, of: metadata))
            if let expected = expectedTransactionID, expected > superblock.transactionID {
                throw ThinMetadataError.pendingTransaction(metadata: superblock.transactionID, lvm: expected)
            }
            return superblock
        }
        self.name = name
        self.metadata = metadata
        metadataBlocks = blocks
        cache = ThinNodeCache(capacity: cachedNodes)
        dataBlockSize = UInt64(superblock.dataBlockSectors) * 512
        transactionID = superblock.transactionID
        dataBlockCount = superblock.dataBlockCount
        needsCheck = superblock.flags & ThinSuperblock.needsCheckFlag != 0
    }

    /// The thin device `id` (lvm2's thin_id) over the pool's data device (_tdata LV bytes); `size`
    /// comes from lvm2's metadata (lv_size).
    public func device(id: UInt64, size: UInt64, data: any BlockDevice) throws -> ThinDevice {
        try ThinMetadataError.inPool(name) {
            guard let (leaf, index) = try lookup(.devices, root: superblock.mappingRoot, key: id) else {
                throw ThinMetadataError.unknownDevice(id: id)
            }
            guard let details = try details(of: id) else { throw ThinMetadataError.missingDetails(id: id) }
            let root = leaf.value64(index)
            // Verifies the device's root now, so that a broken tree fails the open, not a read.
            _ = try seek(.mappings, root: root, referencedBy: leaf.block, key: 0)
            let usable = min(data.size / dataBlockSize, dataBlockCount)
            return ThinDevice(pool: self, id: id, details: details, root: root, rootParent: leaf.block,
                              size: size, data: data, dataBlocks: usable)
        }
    }

    /// Every thin device of the pool, by id, from the device details tree.
    public func devices() throws -> [ThinDeviceDetails] {
        try ThinMetadataError.inPool(name) {
            var devices: [ThinDeviceDetails] = []
            try forEachEntry(.details, root: superblock.detailsRoot, referencedBy: 0, from: 0) { leaf, i in
                devices.append(ThinDeviceDetails.decode(leaf, i))
            }
            return devices
        }
    }

    func details(of id: UInt64) throws -> ThinDeviceDetails? {
        try lookup(.details, root: superblock.detailsRoot, key: id).map { ThinDeviceDetails.decode($0.0, $0.1) }
    }

    // MARK: Btree walks

    /// Where a descent for `key` ends: the leaf whose key range holds it, the index of its first
    /// key ≥ `key` (`count` if none), and the first key past the leaf's range (nil: the tree's end).
    struct LeafPosition {
        let leaf: ThinBtreeNode
        let index: Int
        let end: UInt64?
    }

    /// Descends from `root` (a block number found in block `referencedBy`) towards `key`, as
    /// `dm_btree_lookup` does, checking each node it visits.
    func seek(_ tree: ThinTree, root: UInt64, referencedBy: UInt64, key: UInt64) throws -> LeafPosition {
        try withUnsafeTemporaryAllocation(of: UInt64.self, capacity: Self.maxDepth) { path in
            var block = root
            var parent = referencedBy
            var low: UInt64 = 0
            var end: UInt64?
            var depth = 0
            while true {
                let node = try node(block, referencedBy: parent)
                let expected = node.isLeaf ? tree.leafValueSize : 8
                guard node.valueSize == expected else {
                    throw ThinMetadataError.valueSize(block: block, found: UInt32(node.valueSize), expected: UInt32(expected))
                }
                if node.count > 0, depth > 0, node.key(0) < low || end.map({ node.key(node.count - 1) >= $0 }) ?? false {
                    throw ThinMetadataError.keyOutsideParent(block: block, parent: parent)
                }
                let first = node.firstIndex(notBelow: key)
                if node.isLeaf { return LeafPosition(leaf: node, index: first, end: end) }
                guard node.count > 0 else { throw ThinMetadataError.emptyInternalNode(block: block) }
                path[depth] = block
                depth += 1
                guard depth < Self.maxDepth else { throw ThinMetadataError.tooDeep(block: block) }
                // The last child whose lower bound is ≤ key; the first when key lies below them all.
                let child = first < node.count && node.key(first) == key ? first : max(first - 1, 0)
                if child + 1 < node.count { end = node.key(child + 1) }
                low = node.key(child)
                let next = node.value64(child)
                if path[0..<depth].contains(next) { throw ThinMetadataError.loop(block: next, parent: block) }
                parent = block
                block = next
            }
        }
    }

    /// The leaf and index holding `key` in a tree whose root the superblock names.
    func lookup(_ tree: ThinTree, root: UInt64, key: UInt64) throws -> (ThinBtreeNode, Int)? {
        let at = try seek(tree, root: root, referencedBy: 0, key: key)
        guard at.index < at.leaf.count, at.leaf.key(at.index) == key else { return nil }
        return (at.leaf, at.index)
    }

    /// Calls `body` with each entry whose key is ≥ `from`, in key order. Each leaf costs one
    /// descent; each descent moves past the previous leaf's range, so this ends.
    func forEachEntry(_ tree: ThinTree, root: UInt64, referencedBy: UInt64, from: UInt64,
                      _ body: (ThinBtreeNode, Int) throws -> Void) throws {
        var key = from
        while true {
            let at = try seek(tree, root: root, referencedBy: referencedBy, key: key)
            for i in at.index..<at.leaf.count { try body(at.leaf, i) }
            guard let end = at.end else { return }
            key = end
        }
    }

    /// The verified node in `block`, which block `referencedBy` points to.
    func node(_ block: UInt64, referencedBy: UInt64) throws -> ThinBtreeNode {
        guard block < metadataBlocks else { throw ThinMetadataError.blockPastEnd(block: block, referencedBy: referencedBy) }
        if let cached = cache.node(block) { return cached }
        let node = try ThinBtreeNode.decode(try Self.readBlock(block, of: metadata), block: block)
        cache.insert(node)
        return node
    }

    static func readBlock(_ block: UInt64, of metadata: any BlockDevice) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: blockSize)
        let n = try bytes.withUnsafeMutableBytes { try metadata.read(into: $0, at: block * UInt64(blockSize)) }
        guard n == blockSize else { throw ThinMetadataError.blockPastEnd(block: block, referencedBy: 0) }
        return bytes
    }
}

/// What is wrong with a pool's metadata, and where: block numbers are 4 KiB metadata blocks.
public enum ThinMetadataError: Error, Equatable, CustomStringConvertible {
    case metadataTooSmall(bytes: UInt64)
    case badMagic(UInt64)
    case superblockChecksum
    case superblockLocation(recorded: UInt64)
    case unsupportedVersion(UInt32)
    case unsupportedFeatures(incompat: UInt32)
    case metadataBlockSize(sectors: UInt32)
    case dataBlockSize(sectors: UInt32)
    /// lvm2 has committed a transaction the pool's superblock has not.
    case pendingTransaction(metadata: UInt64, lvm: UInt64)
    case blockPastEnd(block: UInt64, referencedBy: UInt64)
    case nodeLocation(block: UInt64, recorded: UInt64)
    case nodeChecksum(block: UInt64)
    case nodeFlags(block: UInt64, flags: UInt32)
    case maxEntriesTooLarge(block: UInt64, maxEntries: UInt32, valueSize: UInt32)
    case tooManyEntries(block: UInt64, entries: UInt32, maxEntries: UInt32)
    case valueSize(block: UInt64, found: UInt32, expected: UInt32)
    case keysNotIncreasing(block: UInt64, index: Int)
    case keyOutsideParent(block: UInt64, parent: UInt64)
    case emptyInternalNode(block: UInt64)
    case loop(block: UInt64, parent: UInt64)
    case tooDeep(block: UInt64)
    case unknownDevice(id: UInt64)
    case missingDetails(id: UInt64)
    case dataBlockPastEnd(device: UInt64, virtualBlock: UInt64, dataBlock: UInt64, dataBlocks: UInt64)
    /// Any of the above in the pool named ("vg/pool").
    indirect case pool(String, ThinMetadataError)

    public var description: String {
        switch self {
        case .metadataTooSmall(let bytes):
            return "the metadata device holds \(bytes) bytes, less than one 4096-byte block"
        case .badMagic(let magic):
            return "block 0 is not a thin pool superblock (magic \(magic), not \(ThinSuperblock.magic))"
        case .superblockChecksum:
            return "superblock (block 0) checksum mismatch"
        case .superblockLocation(let recorded):
            return "superblock (block 0) records itself as block \(recorded)"
        case .unsupportedVersion(let version):
            return "superblock: metadata version \(version) is not supported (1 or 2)"
        case .unsupportedFeatures(let flags):
            return "superblock: unsupported incompatible features 0x\(String(flags, radix: 16))"
        case .metadataBlockSize(let sectors):
            return "superblock: metadata block size of \(sectors) sectors (only 8, 4096 bytes, exists)"
        case .dataBlockSize(let sectors):
            return "superblock: data block size of \(sectors) sectors is not a multiple of 128 within 128...2097152"
        case .pendingTransaction(let metadata, let lvm):
            return "lvm2 expects transaction \(lvm) but the metadata has committed \(metadata): "
                + "the pool has messages pending; activate it once so that the kernel commits them"
        case .blockPastEnd(let block, let parent):
            return "\(parent == 0 ? "the superblock" : "block \(parent)") points to block \(block), past the end of the metadata device"
        case .nodeLocation(let block, let recorded):
            return "btree node in block \(block) records itself as block \(recorded)"
        case .nodeChecksum(let block):
            return "btree node in block \(block): checksum mismatch"
        case .nodeFlags(let block, let flags):
            return "btree node in block \(block): flags 0x\(String(flags, radix: 16)) are neither internal nor leaf"
        case .maxEntriesTooLarge(let block, let max, let size):
            return "btree node in block \(block): \(max) entries of \(size)-byte values do not fit a block"
        case .tooManyEntries(let block, let n, let max):
            return "btree node in block \(block): \(n) entries, more than its maximum \(max)"
        case .valueSize(let block, let found, let expected):
            return "btree node in block \(block): \(found)-byte values where this tree holds \(expected)-byte values"
        case .keysNotIncreasing(let block, let index):
            return "btree node in block \(block): key \(index) is not greater than key \(index - 1)"
        case .keyOutsideParent(let block, let parent):
            return "btree node in block \(block): keys outside the range its parent (block \(parent)) gives it"
        case .emptyInternalNode(let block):
            return "btree node in block \(block): an internal node without entries"
        case .loop(let block, let parent):
            return "btree node in block \(parent) points back to its ancestor, block \(block)"
        case .tooDeep(let block):
            return "btree under block \(block) is deeper than \(ThinPoolMetadata.maxDepth) levels"
        case .unknownDevice(let id):
            return "no thin device with id \(id) in the mapping tree"
        case .missingDetails(let id):
            return "thin device \(id) has mappings but no entry in the device details tree"
        case .dataBlockPastEnd(let device, let virtual, let data, let count):
            return "thin device \(device): block \(virtual) maps to data block \(data), past the \(count) blocks of the data device"
        case .pool(let name, let error):
            return "thin pool \(name): \(error)"
        }
    }

    /// Runs `body`, giving the pool's name to a `ThinMetadataError` it throws.
    static func inPool<T>(_ name: String, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let error as ThinMetadataError {
            if case .pool = error { throw error }
            throw ThinMetadataError.pool(name, error)
        }
    }
}

/// `struct thin_disk_superblock` (see `ThinPoolMetadata` for the byte offsets).
struct ThinSuperblock: Equatable {
    static let magic: UInt64 = 27_022_010
    static let checksumXor: UInt32 = 160_774
    static let needsCheckFlag: UInt32 = 1

    var flags: UInt32
    var version: UInt32
    var time: UInt32
    var transactionID: UInt64
    var dataBlockCount: UInt64
    var mappingRoot: UInt64
    var detailsRoot: UInt64
    var dataBlockSectors: UInt32

    static func decode(_ bytes: [UInt8]) throws(ThinMetadataError) -> ThinSuperblock {
        precondition(bytes.count == ThinPoolMetadata.blockSize, "a superblock is one metadata block")
        let magic = bytes.le64(at: 32)
        guard magic == Self.magic else { throw .badMagic(magic) }
        let computed = bytes.withUnsafeBytes { CRC32C.dmChecksum(UnsafeRawBufferPointer(rebasing: $0[4...]), xor: checksumXor) }
        guard bytes.le32(at: 0) == computed else { throw .superblockChecksum }
        let blocknr = bytes.le64(at: 8)
        guard blocknr == 0 else { throw .superblockLocation(recorded: blocknr) }
        let version = bytes.le32(at: 40)
        guard (1...2).contains(version) else { throw .unsupportedVersion(version) }
        let incompat = bytes.le32(at: 360)
        guard incompat == 0 else { throw .unsupportedFeatures(incompat: incompat) }
        let metadataSectors = bytes.le32(at: 340)
        guard metadataSectors == UInt32(ThinPoolMetadata.blockSize / 512) else { throw .metadataBlockSize(sectors: metadataSectors) }
        let dataSectors = bytes.le32(at: 336)
        guard (128...2_097_152).contains(dataSectors), dataSectors % 128 == 0 else { throw .dataBlockSize(sectors: dataSectors) }
        return ThinSuperblock(flags: bytes.le32(at: 4), version: version, time: bytes.le32(at: 44),
                              transactionID: bytes.le64(at: 48), dataBlockCount: bytes.le64(at: 64),
                              mappingRoot: bytes.le64(at: 320), detailsRoot: bytes.le64(at: 328),
                              dataBlockSectors: dataSectors)
    }
}

/// The trees of a pool, by what their leaves hold.
enum ThinTree {
    /// Top level of the data mapping tree: thin id → root of the device's tree.
    case devices
    /// Thin id → `struct disk_device_details`.
    case details
    /// One device's tree: virtual block → block-time.
    case mappings

    var leafValueSize: Int { self == .details ? 24 : 8 }
}

/// A verified `struct btree_node`, immutable and shared through the cache.
final class ThinBtreeNode: Sendable {
    static let internalFlag: UInt32 = 1
    static let leafFlag: UInt32 = 2
    static let headerSize = 32
    static let checksumXor: UInt32 = 121_107

    let block: UInt64
    let isLeaf: Bool
    let count: Int
    let valueSize: Int
    private let valuesOffset: Int
    private let bytes: [UInt8]

    private init(block: UInt64, isLeaf: Bool, count: Int, maxEntries: Int, valueSize: Int, bytes: [UInt8]) {
        self.block = block; self.isLeaf = isLeaf; self.count = count; self.valueSize = valueSize
        self.bytes = bytes
        valuesOffset = Self.headerSize + 8 * maxEntries
    }

    /// Checks the node as the kernel's `node_check` does, in its order, then the key order.
    static func decode(_ bytes: [UInt8], block: UInt64) throws(ThinMetadataError) -> ThinBtreeNode {
        precondition(bytes.count == ThinPoolMetadata.blockSize, "a node is one metadata block")
        let recorded = bytes.le64(at: 8)
        guard recorded == block else { throw .nodeLocation(block: block, recorded: recorded) }
        let computed = bytes.withUnsafeBytes { CRC32C.dmChecksum(UnsafeRawBufferPointer(rebasing: $0[4...]), xor: checksumXor) }
        guard bytes.le32(at: 0) == computed else { throw .nodeChecksum(block: block) }
        let entries = bytes.le32(at: 16), maxEntries = bytes.le32(at: 20), valueSize = bytes.le32(at: 24)
        // Both fields are 32 bits: their product can pass 2^64 (found by the fuzzer).
        let (entryBytes, overflow) = (8 + UInt64(valueSize)).multipliedReportingOverflow(by: UInt64(maxEntries))
        guard !overflow, UInt64(headerSize) + entryBytes <= UInt64(bytes.count) else {
            throw .maxEntriesTooLarge(block: block, maxEntries: maxEntries, valueSize: valueSize)
        }
        guard entries <= maxEntries else { throw .tooManyEntries(block: block, entries: entries, maxEntries: maxEntries) }
        let flags = bytes.le32(at: 4)
        let kind = flags & (internalFlag | leafFlag)
        guard kind == internalFlag || kind == leafFlag else { throw .nodeFlags(block: block, flags: flags) }
        let node = ThinBtreeNode(block: block, isLeaf: kind == leafFlag, count: Int(entries),
                                 maxEntries: Int(maxEntries), valueSize: Int(valueSize), bytes: bytes)
        for i in stride(from: 1, to: node.count, by: 1) where node.key(i) <= node.key(i - 1) {
            throw .keysNotIncreasing(block: block, index: i)
        }
        return node
    }

    func key(_ i: Int) -> UInt64 { bytes.le64(at: Self.headerSize + 8 * i) }

    /// The first 8 bytes of value `i`: a child block, a device root or a block-time.
    func value64(_ i: Int) -> UInt64 { bytes.le64(at: valuesOffset + valueSize * i) }

    func value32(_ i: Int, at offset: Int) -> UInt32 { bytes.le32(at: valuesOffset + valueSize * i + offset) }

    func value64(_ i: Int, at offset: Int) -> UInt64 { bytes.le64(at: valuesOffset + valueSize * i + offset) }

    /// The index of the first key ≥ `key`, `count` when there is none.
    func firstIndex(notBelow key: UInt64) -> Int {
        var low = 0, high = count
        while low < high {
            let mid = (low + high) / 2
            if self.key(mid) < key { low = mid + 1 } else { high = mid }
        }
        return low
    }
}

/// `struct disk_device_details`, the value of the device details tree.
public struct ThinDeviceDetails: Equatable, Sendable {
    public var id: UInt64
    public var mappedBlocks: UInt64
    public var transactionID: UInt64
    public var creationTime: UInt32
    public var snapshottedTime: UInt32

    static func decode(_ leaf: ThinBtreeNode, _ i: Int) -> ThinDeviceDetails {
        ThinDeviceDetails(id: leaf.key(i), mappedBlocks: leaf.value64(i, at: 0), transactionID: leaf.value64(i, at: 8),
                          creationTime: leaf.value32(i, at: 16), snapshottedTime: leaf.value32(i, at: 20))
    }
}

/// Verified nodes by block number, at most `capacity` of them, evicted by CLOCK (a hit only sets
/// a bit). Loads happen outside the lock; two readers that miss together both load, one wins.
final class ThinNodeCache: Sendable {
    private struct Slot {
        var node: ThinBtreeNode
        var referenced: Bool
    }
    private struct State {
        var index: [UInt64: Int] = [:]
        var slots: [Slot] = []
        var hand = 0
    }
    let capacity: Int
    private let state = Locked(State())

    init(capacity: Int) { self.capacity = max(capacity, 1) }

    func node(_ block: UInt64) -> ThinBtreeNode? {
        state.withLock { state in
            guard let i = state.index[block] else { return nil }
            state.slots[i].referenced = true
            return state.slots[i].node
        }
    }

    func insert(_ node: ThinBtreeNode) {
        state.withLock { state in
            guard state.index[node.block] == nil else { return }
            if state.slots.count < capacity {
                state.index[node.block] = state.slots.count
                state.slots.append(Slot(node: node, referenced: false))
                return
            }
            // Ends within two turns: the first clears every reference bit it passes.
            while state.slots[state.hand].referenced {
                state.slots[state.hand].referenced = false
                state.hand = (state.hand + 1) % state.slots.count
            }
            state.index[state.slots[state.hand].node.block] = nil
            state.slots[state.hand] = Slot(node: node, referenced: false)
            state.index[node.block] = state.hand
            state.hand = (state.hand + 1) % state.slots.count
        }
    }

    var count: Int { state.withLock { $0.slots.count } }
}

private extension Array where Element == UInt8 {
    /// Callers keep `at + 8` within the array (offsets come from the layouts above, checked).
    func le64(at offset: Int) -> UInt64 {
        withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
    }

    func le32(at offset: Int) -> UInt32 {
        withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    }
}
