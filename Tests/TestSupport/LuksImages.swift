/// Shell commands that make LUKS images for the refusal tests. qemu-img calibrates LUKS key
/// derivation on the thread's CPU time, which this VM sometimes cannot measure ("Unable to get
/// accurate CPU usage", seen five times running in one CI run on an idle machine), so each
/// command tries qemu-img three times and then makes the same image another way: a LUKS1 header
/// (magic and version, what QEMU and poolfs detect) for a raw LUKS file; for a qcow2, an
/// AES-encrypted qcow2 (which needs no key derivation) whose crypt_method field (byte 32) is set
/// to 2, LUKS. A raw stand-in leaves NAME.stand-in beside it: QEMU's probe of a bare header is
/// no oracle (it opens the image to decide).
public enum LuksImages {
    public static func raw(_ name: String, bytes: Int) -> String {
        """
        { for i in 1 2 3; do qemu-img create -q --object secret,id=s0,data=k -f luks -o key-secret=s0,iter-time=100 '\(name)' \(bytes) && break; rm -f '\(name)'; done; \
        test -s '\(name)' || { { printf 'LUKS\\272\\276\\000\\001'; head -c \(bytes - 8) /dev/zero; } > '\(name)' && touch '\(name).stand-in'; }; }
        """
    }

    public static func qcow2(_ name: String, bytes: Int) -> String {
        """
        { for i in 1 2 3; do qemu-img create -q --object secret,id=s0,data=k -f qcow2 -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100 '\(name)' \(bytes) && break; rm -f '\(name)'; done; \
        test -s '\(name)' || { qemu-img create -q --object secret,id=s0,data=k -f qcow2 -o encrypt.format=aes,encrypt.key-secret=s0 '\(name)' \(bytes) && \
        printf '\\000\\000\\000\\002' | dd of='\(name)' bs=1 seek=32 conv=notrunc status=none; }; }
        """
    }
}
