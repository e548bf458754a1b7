import Foundation

/// Hostile images built at test time from ones qemu-img makes (nothing binary is committed).
public enum HostileImages {
    /// A 32 TiB qcow2 (64 KiB clusters) whose 65,536 L1 entries all point to one L2 table, whose
    /// 8192 entries all point to one data cluster: every byte of the disk reads as data, from a
    /// file of a few hundred KiB. Counting its allocation cluster by cluster visits 2^29 entries.
    public static func oneTableEverywhere(_ name: String, in scratch: Scratch) throws {
        try scratch.sh("""
            qemu-img create -q -f qcow2 '\(name)' 32T && qemu-io -c 'write -P 0x5a 0 64k' '\(name)' > /dev/null &&
            python3 - '\(name)' <<'PY'
            import struct, sys
            path = sys.argv[1]
            with open(path, 'r+b') as f:
                header = f.read(112)
                l1_size, l1_offset = struct.unpack('>IQ', header[36:48])
                f.seek(l1_offset); first = f.read(8)
                l2_offset = struct.unpack('>Q', first)[0] & 0x00fffffffffffe00
                f.seek(l1_offset); f.write(first * l1_size)
                f.seek(l2_offset); entry = f.read(8)
                f.seek(l2_offset); f.write(entry * 8192)
            PY
            """)
    }
}
