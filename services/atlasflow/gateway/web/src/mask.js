// Mask bookkeeping between NiiVue's drawing bitmap and the label map, and the revision encoding.
//
// NiiVue keeps volumes in their native voxel order (NIfTI on-disk: x fastest) and its drawing
// bitmap in RAS voxel order; `img2RASstep` / `img2RASstart` of the background volume map a RAS
// voxel to its native index (the same loops as NiiVue's own ImageWriter). The label map has the
// CT's grid (same shape and affine), so one mapping serves both.

/** Native index of every RAS-ordered voxel, as an Int32Array (computed once per case). */
export function rasToNativeIndex(back) {
  const dims = back.dimsRAS
  const step = back.img2RASstep
  const start = back.img2RASstart
  const out = new Int32Array(dims[1] * dims[2] * dims[3])
  let r = 0
  for (let z = 0; z < dims[3]; z++) {
    const zi = start[2] + z * step[2]
    for (let y = 0; y < dims[2]; y++) {
      const yi = start[1] + y * step[1]
      for (let x = 0; x < dims[1]; x++) out[r++] = start[0] + x * step[0] + yi + zi
    }
  }
  return out
}

/** The drawing bitmap (RAS order) of `organ` from the native label map: 1 inside, 0 outside. */
export function organToDrawing(labels, organ, rasToNative) {
  const bitmap = new Uint8Array(rasToNative.length)
  for (let r = 0; r < rasToNative.length; r++) bitmap[r] = labels[rasToNative[r]] === organ ? 1 : 0
  return bitmap
}

/** A drawing bitmap (RAS order, nonzero = organ) as a native-order 0/1 mask. */
export function drawingToNative(bitmap, rasToNative) {
  const mask = new Uint8Array(rasToNative.length)
  for (let r = 0; r < rasToNative.length; r++) if (bitmap[r]) mask[rasToNative[r]] = 1
  return mask
}

/**
 * `OrganRevision.xor_delta` of labels.proto: gzip(packbits(parent XOR new)), voxels in native
 * (Fortran, x fastest) order, 8 per byte, least significant bit first. Returns
 * { b64, changed } (base64 of the gzip bytes, number of voxels that differ).
 */
export async function xorDelta(labels, organ, nativeMask) {
  const n = nativeMask.length
  const packed = new Uint8Array((n + 7) >> 3)
  let changed = 0
  for (let i = 0; i < n; i++) {
    if ((labels[i] === organ ? 1 : 0) !== nativeMask[i]) {
      packed[i >> 3] |= 1 << (i & 7)
      changed++
    }
  }
  const gz = await new Response(new Blob([packed]).stream().pipeThrough(new CompressionStream('gzip'))).arrayBuffer()
  return { b64: base64(new Uint8Array(gz)), changed }
}

function base64(bytes) {
  let s = ''
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000))
  return btoa(s)
}
