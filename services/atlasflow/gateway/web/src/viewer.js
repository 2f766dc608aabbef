// The case viewer: NiiVue configured for CT review (no viewer code of our own beyond state).
//
// Volumes: 0 = CT, 1 = label map (the nine organs, a label colormap whose alpha hides an organ),
// 2 = attention heatmap (optional). Radiological convention: the screen's left is the patient's
// right on axial and coronal views (NiiVue's isRadiologicalConvention), markers on all sides.

import { Niivue, SLICE_TYPE, SHOW_RENDER, MULTIPLANAR_TYPE } from '@niivue/niivue'
import { drawingToNative, organToDrawing, rasToNativeIndex } from './mask.js'

export const ORGANS = [
  // value, name, colour (RGB)
  [1, 'aorta', [230, 25, 75]],
  [2, 'gall_bladder', [60, 180, 75]],
  [3, 'kidney_left', [255, 225, 25]],
  [4, 'kidney_right', [0, 130, 200]],
  [5, 'liver', [245, 130, 48]],
  [6, 'pancreas', [145, 30, 180]],
  [7, 'postcava', [70, 240, 240]],
  [8, 'spleen', [240, 50, 230]],
  [9, 'stomach', [210, 245, 60]],
]
export const ORGAN_VALUE = Object.fromEntries(ORGANS.map(([v, n]) => [n, v]))

// Window/level presets (HU): abdomen soft tissue, liver (narrow, raised level), bone.
export const PRESETS = {
  abdomen: { width: 400, level: 40 },
  liver: { width: 150, level: 60 },
  bone: { width: 1800, level: 400 },
}

const VIEWS = {
  axial: SLICE_TYPE.AXIAL,
  coronal: SLICE_TYPE.CORONAL,
  sagittal: SLICE_TYPE.SAGITTAL,
  multiplanar: SLICE_TYPE.MULTIPLANAR,
}

export class Viewer {
  constructor(canvas) {
    this.nv = new Niivue({
      isRadiologicalConvention: true,
      showAllOrientationMarkers: true,
      isOrientationTextVisible: true,
      multiplanarShowRender: SHOW_RENDER.NEVER,
      multiplanarLayout: MULTIPLANAR_TYPE.GRID,
      dragAndDropEnabled: false,
      backColor: [0, 0, 0, 1],
      crosshairColor: [0.3, 0.7, 1, 0.8],
      crosshairWidth: 1,
      penSize: 5,
      isNearestInterpolation: false,
      drawOpacity: 0.75,
      maxDrawUndoBitmaps: 32,
      loadingText: 'loading CT...',
    })
    this.canvas = canvas
    this.hidden = new Set()
    this.editing = 0 // organ value being revised (its mask is the drawing bitmap), 0 = none
    this.labelOpacity = 0.5
    this.heatOpacity = 0.45
    this.heatOn = true
    this.view = 'axial'
    this.redo = []
  }

  async load(links, versionId, hasAttention) {
    await this.nv.attachToCanvas(this.canvas)
    this.nv.setRadiologicalConvention(true)
    const list = [
      { url: links.ct, name: 'ct.nii.gz', colormap: 'gray' },
      { url: `${links.labels}?version_id=${encodeURIComponent(versionId)}`, name: 'labels.nii.gz', opacity: this.labelOpacity },
    ]
    if (hasAttention) list.push({ url: links.attention, name: 'attention.nii.gz', colormap: 'warm', opacity: this.heatOpacity })
    await this.nv.loadVolumes(list)
    this.ct = this.nv.volumes[0]
    this.labels = this.nv.volumes[1]
    this.heat = hasAttention ? this.nv.volumes[2] : null
    this.rasToNative = rasToNativeIndex(this.ct)
    if (this.heat) {
      // show the upper part of the map only: the regions the ranking points at
      const max = this.heat.global_max || this.heat.cal_max || 1
      this.heat.cal_min = 0.2 * max
      this.heat.cal_max = max
    }
    this.setPreset('abdomen', false)
    this.applyLabelColours(false)
    this.setView('axial')
    this.nv.updateGLVolume()
  }

  /** Free the GPU: the WebGL context of a closed case is lost on purpose (browsers keep a few). */
  dispose() {
    const gl = this.nv.gl
    const ext = gl && gl.getExtension('WEBGL_lose_context')
    if (ext) ext.loseContext()
    this.nv.volumes = []
  }

  showCrosshair(on) {
    this.nv.setCrosshairWidth(on ? 1 : 0)
  }

  /** Native-order label value of every voxel (Uint8/Int16 array of the label map). */
  get labelData() {
    return this.labels.img
  }

  setPreset(name, redraw = true) {
    const p = PRESETS[name]
    this.ct.cal_min = p.level - p.width / 2
    this.ct.cal_max = p.level + p.width / 2
    this.preset = name
    if (redraw) this.nv.updateGLVolume()
  }

  setView(name) {
    this.view = name
    this.nv.setSliceType(VIEWS[name])
  }

  applyLabelColours(redraw = true) {
    const cm = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: [''] }
    for (const [v, n, rgb] of ORGANS) {
      cm.R.push(rgb[0])
      cm.G.push(rgb[1])
      cm.B.push(rgb[2])
      cm.A.push(this.hidden.has(v) || this.editing === v ? 0 : 255)
      cm.I.push(v)
      cm.labels.push(n)
    }
    this.labels.setColormapLabel(cm)
    this.nv.setOpacity(1, this.labelOpacity)
    if (redraw) this.nv.updateGLVolume()
  }

  setOrganVisible(value, visible) {
    if (visible) this.hidden.delete(value)
    else this.hidden.add(value)
    this.applyLabelColours()
  }

  setLabelOpacity(v) {
    this.labelOpacity = v
    this.nv.setOpacity(1, v)
  }

  setHeat(on, opacity = this.heatOpacity) {
    if (!this.heat) return
    this.heatOn = on
    this.heatOpacity = opacity
    this.nv.setOpacity(2, on ? opacity : 0)
  }

  /** Move the crosshair (and the displayed slices) to a RAS+ mm position. */
  goToMM(mm) {
    this.nv.scene.crosshairPos = this.nv.mm2frac([mm[0], mm[1], mm[2]])
    this.nv.drawScene()
    this.nv.createOnLocationChange()
  }

  crosshairMM() {
    return Array.from(this.nv.frac2mm(this.nv.scene.crosshairPos)).slice(0, 3)
  }

  /** Canvas CSS-pixel position of a RAS+ mm point on the first tile of `view` (NiiVue's own
   *  screen->mm mapping, inverted on the tile: it is affine there). null when not on screen. */
  screenOfMM(mm, view = this.view === 'multiplanar' ? 'axial' : this.view) {
    const nv = this.nv
    const dpr = nv.uiData.dpr || 1
    const tile = nv.screenSlices.find((s) => s.axCorSag === VIEWS[view])
    if (!tile) return null
    const [l, t, w, h] = tile.leftTopWidthHeight
    const x0 = l + w * 0.25
    const y0 = t + h * 0.25
    const d = Math.max(8, w * 0.25)
    const m0 = nv.screenXY2mm(x0, y0)
    const mx = nv.screenXY2mm(x0 + d, y0)
    const my = nv.screenXY2mm(x0, y0 + d)
    const ex = [0, 1, 2].map((i) => (mx[i] - m0[i]) / d)
    const ey = [0, 1, 2].map((i) => (my[i] - m0[i]) / d)
    const r = [0, 1, 2].map((i) => mm[i] - m0[i])
    // least squares of r = a ex + b ey
    const dot = (p, q) => p[0] * q[0] + p[1] * q[1] + p[2] * q[2]
    const exx = dot(ex, ex)
    const eyy = dot(ey, ey)
    const exy = dot(ex, ey)
    const det = exx * eyy - exy * exy
    const a = (eyy * dot(r, ex) - exy * dot(r, ey)) / det
    const b = (exx * dot(r, ey) - exy * dot(r, ex)) / det
    const x = x0 + a
    const y = y0 + b
    if (x < l || x > l + w || y < t || y > t + h) return null
    return { x: x / dpr, y: y / dpr }
  }

  /** RAS+ mm under a canvas CSS-pixel position (NaN outside a 2D tile). */
  mmAtScreen(x, y) {
    const dpr = this.nv.uiData.dpr || 1
    return Array.from(this.nv.screenXY2mm(x * dpr, y * dpr)).slice(0, 3)
  }

  // ----------------------------------------------------------------- revising one organ
  /** Start (or resume) revising `organ`: its mask becomes the drawing bitmap. `nativeMask`:
   *  an earlier edit of this organ (native order), else the label map's mask. */
  beginEdit(organ, nativeMask, colour) {
    this.endEdit()
    const nv = this.nv
    this.editing = organ
    nv.setDrawColormap({ R: [0, colour[0]], G: [0, colour[1]], B: [0, colour[2]], A: [0, 255], I: [0, 1], labels: ['', 'edit'] })
    nv.createEmptyDrawing()
    nv.drawBitmap = nativeMask ? nativeToDrawing(nativeMask, this.rasToNative) : organToDrawing(this.labelData, organ, this.rasToNative)
    nv.drawClearAllUndoBitmaps()
    nv.drawAddUndoBitmap()
    nv.refreshDrawing(true)
    this.redo = []
    this.applyLabelColours()
  }

  /** The organ's edited mask (native order), or null when not editing. */
  editedMask() {
    if (!this.editing || !this.nv.drawBitmap) return null
    return drawingToNative(this.nv.drawBitmap, this.rasToNative)
  }

  endEdit() {
    if (!this.editing) return
    this.editing = 0
    this.nv.setDrawingEnabled(false)
    this.nv.closeDrawing()
    this.redo = []
    this.applyLabelColours()
  }

  /** tool: 'navigate' | 'brush' | 'eraser' */
  setTool(tool) {
    this.tool = tool
    if (!this.editing || tool === 'navigate') {
      this.nv.setDrawingEnabled(false)
      return
    }
    this.nv.setDrawingEnabled(true)
    this.nv.setPenValue(tool === 'eraser' ? 0 : 1, false)
  }

  setPenSize(px) {
    this.nv.opts.penSize = px
  }

  undo() {
    if (!this.editing) return
    this.redo.push(this.nv.drawBitmap.slice())
    this.nv.drawUndo()
  }

  redoStroke() {
    if (!this.editing || this.redo.length === 0) return
    this.nv.drawBitmap = this.redo.pop()
    this.nv.drawAddUndoBitmap()
    this.nv.refreshDrawing(true)
  }
}

function nativeToDrawing(mask, rasToNative) {
  const bitmap = new Uint8Array(rasToNative.length)
  for (let r = 0; r < rasToNative.length; r++) bitmap[r] = mask[rasToNative[r]]
  return bitmap
}
