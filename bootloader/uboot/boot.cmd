# fieldpatch A/B boot selector for U-Boot (hush shell; tested with Debian 12's U-Boot 2023.01
# for qemu_arm64 under QEMU by uboot_test.go). The same algorithm as the Go selector
# (internal/device/boot) and bootloader/grub/grub.cfg, on the same variables: docs/BOOTLOADER.md.
# Build: mkimage -A arm64 -T script -C none -n fieldpatch -d boot.cmd boot.scr
#
# Disk layout (virtio 0, 512-byte blocks):
#   env copy 0 at byte 0x8000 (block 0x40), copy 1 at 0xC000 (block 0x60), 0x4000 bytes (0x20 blocks) each;
#   U-Boot env layout: CRC32 (LE) over the data area, then "k=v\0...\0\0" (no flags byte).
#   partition 1: FAT (this script), partition 2: slot a FIT (raw), partition 3: slot b FIT (raw).
# Prints exactly one decision line:
#   FIELDPATCH: booted=<a|b|none> reason=<...> active=<a|b> trial=<a|b|-> left=<n> seq=<n>
# All contract values are decimal; setexpr/itest work in hex, so decimals are converted with
# fp_dec2hex / fp_hex2dec below (no single-digit limit).

setenv verify yes
setenv fp_b0  0x45000000
setenv fp_b1  0x45010000
setenv fp_wb  0x45020000
setenv fp_rb  0x45030000
setenv fp_tmp 0x45040000
setenv fp_fit_a 0x46000000
setenv fp_fit_b 0x47000000

# fp_dec2hex: fp_in (decimal string) -> fp_hex (hex), fp_dok=1 if fp_in is 1..15 decimal digits.
setenv fp_dec2hex '
mw.b ${fp_tmp} 0 0x40;
env export -t ${fp_tmp} fp_in;
setexpr fp_p ${fp_tmp} + 6;
setenv fp_hex 0; setenv fp_dok 0; setenv fp_st 0;
for fp_i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do
 if test ${fp_st} = 0; then
  setexpr.b fp_c *${fp_p};
  if itest ${fp_c} -ge 30 && itest ${fp_c} -le 39; then
   setexpr fp_hex ${fp_hex} * a; setexpr fp_hex ${fp_hex} + ${fp_c}; setexpr fp_hex ${fp_hex} - 30;
   setexpr fp_p ${fp_p} + 1; setenv fp_dok 1;
  else
   if itest ${fp_c} != a; then setenv fp_dok 0; fi;
   setenv fp_st 1;
  fi;
 fi;
done;
if test ${fp_st} = 0; then setenv fp_dok 0; fi'

# fp_hex2dec: fp_hex (hex) -> fp_dec (decimal string).
setenv fp_hex2dec '
setexpr fp_v ${fp_hex} + 0; setenv fp_dec;
for fp_i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do
 if test -z "${fp_dec}" || itest ${fp_v} != 0; then
  setexpr fp_d ${fp_v} % a; setenv fp_dec ${fp_d}${fp_dec}; setexpr fp_v ${fp_v} / a;
 fi;
done'

# fp_check: fp_s (a|b) -> fp_ok_<s>=1 if the slot FIT is verified (config signature with the
# required key in the control DTB + image hashes, via "bootm start") and its signed
# fp-security-counter >= fp_nv_counter.
setenv fp_check '
setenv fp_ok 0;
if test ${fp_s} = a; then setenv fp_part 2; setenv fp_fit ${fp_fit_a}; else setenv fp_part 3; setenv fp_fit ${fp_fit_b}; fi;
if test ${fp_keyok} != 1; then
 echo "FIELDPATCH: slot ${fp_s}: not checked, no required key in the control DTB";
elif part start virtio 0 ${fp_part} fp_pstart && part size virtio 0 ${fp_part} fp_psize && virtio read ${fp_fit} ${fp_pstart} 1 && fdt addr -q ${fp_fit} && fdt header get fp_tsz totalsize; then
 setexpr fp_n ${fp_tsz} + 1ff; setexpr fp_n ${fp_n} / 200;
 if itest ${fp_n} -le ${fp_psize} && itest ${fp_n} -le 8000 && virtio read ${fp_fit} ${fp_pstart} ${fp_n} && setenv verify yes && bootm start ${fp_fit}#conf && fdt addr -q ${fp_fit} && fdt get value fp_in /configurations/conf fp-security-counter; then
  run fp_dec2hex;
  if test ${fp_dok} = 1 && test ${fp_nvok} = 1 && itest ${fp_hex} -ge ${fp_nvx}; then
   setenv fp_ok 1; echo "FIELDPATCH: slot ${fp_s}: verified, security counter ${fp_in}";
  else
   echo "FIELDPATCH: slot ${fp_s}: security counter ${fp_in} rejected, fp_nv_counter=${fp_nv_counter} (anti-rollback)";
  fi;
 else
  echo "FIELDPATCH: slot ${fp_s}: FIT verification failed";
 fi;
else
 echo "FIELDPATCH: slot ${fp_s}: no FIT found";
fi;
setenv fp_ok_${fp_s} ${fp_ok}'

# fp_save: two-copy save. fp_seq = winner seq + 1 (+1 more if that would hit the copy we read from),
# written to copy (fp_seq mod 2), then read back and compared. Sets fp_saved=1 on success.
setenv fp_save '
setenv fp_saved 0;
setexpr fp_hex ${fp_sx} + 1; setexpr fp_t ${fp_hex} % 2;
if test "${fp_t}" = "${fp_w}"; then setexpr fp_hex ${fp_hex} + 1; setexpr fp_t ${fp_hex} % 2; fi;
run fp_hex2dec; setenv fp_seq_old ${fp_seq}; setenv fp_seq ${fp_dec};
if test ${fp_t} = 0; then setenv fp_blk 0x40; else setenv fp_blk 0x60; fi;
mw.b ${fp_rb} 0 0x4000;
if env export -c -s 0x4000 ${fp_wb} fp_active fp_trial fp_trial_left fp_booted fp_boot_reason fp_seq fp_nv_counter && virtio write ${fp_wb} ${fp_blk} 0x20 && virtio read ${fp_rb} ${fp_blk} 0x20 && cmp.b ${fp_wb} ${fp_rb} 0x4000; then
 setenv fp_saved 1; setenv fp_sx ${fp_hex}; setenv fp_w ${fp_t};
 echo "FIELDPATCH: saved copy ${fp_t} seq=${fp_seq}";
else
 setenv fp_seq ${fp_seq_old}; setenv fp_savefail 1;
 echo "FIELDPATCH: save failed";
fi'

# ---- 1. read both copies: CRC-valid ones count, higher fp_seq wins (tie: copy 0) ----
virtio scan
setenv fp_v0 0; setenv fp_v1 0; setenv fp_s0 0; setenv fp_s1 0
if virtio read ${fp_b0} 0x40 0x20; then
 env delete fp_seq
 if env import -c ${fp_b0} 0x4000 fp_seq; then
  setenv fp_v0 1; setenv fp_in ${fp_seq}; run fp_dec2hex
  if test ${fp_dok} = 1; then setenv fp_s0 ${fp_hex}; fi
 fi
fi
if virtio read ${fp_b1} 0x60 0x20; then
 env delete fp_seq
 if env import -c ${fp_b1} 0x4000 fp_seq; then
  setenv fp_v1 1; setenv fp_in ${fp_seq}; run fp_dec2hex
  if test ${fp_dok} = 1; then setenv fp_s1 ${fp_hex}; fi
 fi
fi
if test ${fp_v0} = 1 && test ${fp_v1} = 1; then
 if itest ${fp_s1} -gt ${fp_s0}; then setenv fp_w 1; else setenv fp_w 0; fi
elif test ${fp_v0} = 1; then setenv fp_w 0
elif test ${fp_v1} = 1; then setenv fp_w 1
else setenv fp_w none
fi

# Only the contract variables are imported (allow-list): nothing else from the disk
# (e.g. verify=no, bootcmd) can reach the running environment.
env delete fp_active fp_trial fp_trial_left fp_booted fp_boot_reason fp_seq fp_nv_counter
if test ${fp_w} = 0; then
 env import -c ${fp_b0} 0x4000 fp_active fp_trial fp_trial_left fp_booted fp_boot_reason fp_seq fp_nv_counter
 setenv fp_sx ${fp_s0}
elif test ${fp_w} = 1; then
 env import -c ${fp_b1} 0x4000 fp_active fp_trial fp_trial_left fp_booted fp_boot_reason fp_seq fp_nv_counter
 setenv fp_sx ${fp_s1}
else
 echo "FIELDPATCH: no valid environment copy, using defaults (fp_active=a)"
 setenv fp_active a; setenv fp_sx 0
fi
echo "FIELDPATCH: env copy0 valid=${fp_v0} copy1 valid=${fp_v1} using=${fp_w}"
setenv fp_hex ${fp_sx}; run fp_hex2dec; setenv fp_seq ${fp_dec}

# ---- 2. normalise ----
if test "${fp_active}" != a && test "${fp_active}" != b; then
 echo "FIELDPATCH: invalid fp_active [${fp_active}], using a"; setenv fp_active a
fi
setenv fp_in ${fp_trial_left}; run fp_dec2hex
if test ${fp_dok} = 1; then setenv fp_lx ${fp_hex}; else setenv fp_lx 0; fi
# fail closed if U-Boot runs without the public key (a FIT would then pass without any signature)
setenv fp_keyok 0
if fdt addr -q ${fdtcontroladdr} && fdt get value fp_kreq /signature/key-fp-dev required && test "${fp_kreq}" = conf; then
 setenv fp_keyok 1
else
 echo "FIELDPATCH: no required key key-fp-dev in the control DTB, refusing all slots"
fi
# stand-in for an OTP counter: missing -> 0, malformed -> no slot passes (fail closed)
setenv fp_nvok 1; setenv fp_nvx 0
if test -n "${fp_nv_counter}"; then
 setenv fp_in ${fp_nv_counter}; run fp_dec2hex
 if test ${fp_dok} = 1; then setenv fp_nvx ${fp_hex}; else setenv fp_nvok 0; echo "FIELDPATCH: malformed fp_nv_counter"; fi
fi
setenv fp_o_left ${fp_trial_left}; setenv fp_o_booted ${fp_booted}; setenv fp_o_reason ${fp_boot_reason}
setenv fp_orig "${fp_active}/${fp_trial}/${fp_trial_left}/${fp_booted}/${fp_boot_reason}"

# ---- 3. verify both slots ----
setenv fp_s a; run fp_check
setenv fp_s b; run fp_check

# ---- 4. decide ----
setenv fp_done 0; setenv fp_rolled 0; setenv fp_savefail 0
if test -n "${fp_trial}"; then
 if test "${fp_trial}" = a; then setenv fp_tok ${fp_ok_a}; elif test "${fp_trial}" = b; then setenv fp_tok ${fp_ok_b}; else setenv fp_tok 0; fi
 if itest ${fp_lx} -gt 0 && test ${fp_tok} = 1; then
  setexpr fp_hex ${fp_lx} - 1; run fp_hex2dec; setenv fp_trial_left ${fp_dec}
  setenv fp_booted ${fp_trial}; setenv fp_boot_reason trial
  run fp_save
  if test ${fp_saved} = 1; then
   setenv fp_done 1
  else
   # the decrement is not persisted: never boot the trial, boot the active slot instead
   setenv fp_trial_left ${fp_o_left}; setenv fp_booted ${fp_o_booted}; setenv fp_boot_reason ${fp_o_reason}
  fi
 else
  setenv fp_trial; setenv fp_trial_left 0; setenv fp_rolled 1
 fi
fi
if test ${fp_done} = 0; then
 if test ${fp_active} = a; then setenv fp_other b; setenv fp_aok ${fp_ok_a}; setenv fp_ook ${fp_ok_b}
 else setenv fp_other a; setenv fp_aok ${fp_ok_b}; setenv fp_ook ${fp_ok_a}; fi
 if test ${fp_aok} = 1; then
  setenv fp_booted ${fp_active}
  if test ${fp_rolled} = 1; then setenv fp_boot_reason rollback; else setenv fp_boot_reason active; fi
 elif test ${fp_ook} = 1; then
  setenv fp_active ${fp_other}; setenv fp_booted ${fp_other}; setenv fp_boot_reason fallback
 else
  setenv fp_booted; setenv fp_boot_reason recovery
 fi
 # one save for rollback/fallback/recovery, and whenever fp_booted/fp_boot_reason changed
 # (a steady-state active boot writes nothing)
 if test ${fp_savefail} = 0 && test "${fp_active}/${fp_trial}/${fp_trial_left}/${fp_booted}/${fp_boot_reason}" != "${fp_orig}"; then
  run fp_save
 fi
fi

# ---- 5. report and "boot" ----
if test -n "${fp_booted}"; then setenv fp_pb ${fp_booted}; else setenv fp_pb none; fi
if test -n "${fp_trial}"; then setenv fp_pt ${fp_trial}; else setenv fp_pt -; fi
if test -n "${fp_trial_left}"; then setenv fp_pl ${fp_trial_left}; else setenv fp_pl 0; fi
echo "FIELDPATCH: booted=${fp_pb} reason=${fp_boot_reason} active=${fp_active} trial=${fp_pt} left=${fp_pl} seq=${fp_seq}"
# A real board would now boot the verified image already in RAM, e.g.
#   setenv bootargs "${bootargs} fieldpatch.booted=${fp_pb} fieldpatch.reason=${fp_boot_reason}"
#   bootm ${fp_fit_a}#conf   (or fp_fit_b; bootm verifies again)
poweroff
